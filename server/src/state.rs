//! `ShardState`: the replicated state machine of one shard.
//!
//! Every committed raft entry is one [`RaftCommand`] and is applied here, in
//! log order, by [`ShardState::apply`] — the single apply path that every
//! engine shares. It does no I/O of its own beyond writing one engine batch
//! per entry (data, intents, decisions and the applied index together, so a
//! crash leaves either all of an entry or none of it; the raft log, synced
//! before apply, replays what was lost). Given the same entries it produces
//! the same state and the same answers on every replica and every replay.
//!
//! Besides the MVCC data, the state holds the shard's side of cross-shard
//! transactions (two-phase commit over the shards' raft groups):
//! - an *intent* per prepared transaction: the whole txn, the primary and
//!   the participants, persisted under `I` + txn id;
//! - *locks* derived from intents: every key or key range the txn may
//!   compare, read or write on this shard. A single-shard write or another
//!   prepare touching a locked key is refused with `CONFLICT` (nothing
//!   applied; the gateway retries), so the compares a prepare evaluated stay
//!   true until its commit;
//! - on the primary, the *decision* (committed at revision R along a path,
//!   or aborted), persisted under `D` + txn id. A commit at the primary is
//!   the commit point; a participant that never hears the outcome asks the
//!   primary (see `crate::shard`).
//!
//! Invariants:
//! - a prepared txn's keys change only by its own commit or abort;
//! - a txn is committed on the primary at most once, and never after it was
//!   aborted there (and vice versa);
//! - a commit on a participant uses the primary's revision, so all shards
//!   record the txn's changes at one revision. That revision may be below
//!   revisions this shard applied meanwhile to *other* keys; per key,
//!   revisions still only grow (the key was locked).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::rc::Rc;

use metastore_proto::etcdserverpb::{
    DeleteRangeRequest, PutRequest, RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use metastore_proto::router::ShardRouter;
use metastore_proto::shardpb::{
    raft_command::Op, shard_error::Code, shard_response::Body, AbortResponse, CommitRequest,
    CommitResponse, CompactResponse, Decision, Intent, LeaseRecord, LeaseRegisterRequest,
    LeaseRegisterResponse, PrepareRequest, PrepareResponse, RaftCommand, ShardError,
};
use metastore_proto::txn;
use prost::Message;

use crate::engine::{keyspace, Engine, WriteBatch};
use crate::mvcc::{Mvcc, MvccError, WriteEvent};

/// At most this many primary decisions are kept. A participant needs its
/// txn's decision until it has committed (seconds), and the shard forgets
/// each one once it is old enough (`ForgetDecisionsRequest`); this bound
/// only keeps memory finite under a rate of cross-shard txns no machine
/// reaches (it is about a minute of 15,000 txns/s). Past it the oldest
/// are dropped, in log order, so every replica drops the same ones.
pub const MAX_DECISIONS: usize = 1_000_000;

const APPLIED_KEY: &[u8] = b"Sapplied";

/// The largest event vector kept from one applied entry for the next.
const KEPT_EVENTS: usize = 64;

/// A cross-shard transaction's id (16 random bytes chosen by the gateway).
pub type TxnId = Vec<u8>;

/// Errors that stop the shard (the engine failed or data is corrupt).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("mvcc: {0}")]
    Mvcc(#[from] MvccError),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
    #[error("corrupt state: {0}")]
    Corrupt(String),
}

/// A key (`end` empty) or a key range `[start, end)`; `end == [0]` means
/// every key from `start` on, as in etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Span {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl Span {
    fn new(start: &[u8], end: &[u8]) -> Self {
        Span {
            start: start.to_vec(),
            end: end.to_vec(),
        }
    }
    /// Whether this span is a single key.
    fn is_key(&self) -> bool {
        self.end.is_empty()
    }
    /// Whether every key of this span sorts before `key`. A single key `k`
    /// is the span `[k, k\0)`, and `k\0 <= key` exactly when `k < key`.
    fn below(&self, key: &[u8]) -> bool {
        if self.is_key() {
            self.start.as_slice() < key
        } else if self.end == [0] {
            false
        } else {
            self.end.as_slice() <= key
        }
    }
    fn overlaps(&self, other: &Span) -> bool {
        !(self.below(&other.start) || other.below(&self.start))
    }
    /// [`Span::overlaps`] with the single key `key`.
    fn contains(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && !self.below(key)
    }
}

/// Locks held by prepared transactions on this shard.
///
/// Nearly every lock is a single key (each key a txn puts, deletes or
/// compares); those sit in an ordered map, so checking a key is one lookup
/// and checking a range walks only the locked keys inside it. Range locks
/// (a txn's ranged delete or compare) are rare and kept in a list that every
/// check walks. Every write checks the table, and a few hundred txns in
/// flight hold a thousand locks: a plain list of them made each check a scan
/// (40% of the shard's CPU under 4-key cross-shard txns).
#[derive(Default)]
struct LockTable {
    /// Locked single keys → the txns holding them (normally one: a lock is
    /// only granted when nothing else holds it, but a txn may name a key
    /// twice, and locks restored from intents are not re-checked).
    keys: BTreeMap<Vec<u8>, Vec<TxnId>>,
    /// Range locks and their txns.
    ranges: Vec<(Span, TxnId)>,
    /// Every span each txn holds, to release them.
    by_txn: HashMap<TxnId, Vec<Span>>,
}

impl LockTable {
    fn conflicts(&self, span: &Span, except: Option<&[u8]>) -> bool {
        if span.is_key() {
            return self.key_conflicts(&span.start, except);
        }
        let other = |id: &TxnId| Some(id.as_slice()) != except;
        if self
            .ranges
            .iter()
            .any(|(s, id)| other(id) && s.overlaps(span))
        {
            return true;
        }
        if self.keys.is_empty() {
            return false;
        }
        let upper = if span.end == [0] {
            Bound::Unbounded
        } else if span.end <= span.start {
            return false; // an empty range
        } else {
            Bound::Excluded(span.end.as_slice())
        };
        self.keys
            .range::<[u8], _>((Bound::Included(span.start.as_slice()), upper))
            .any(|(_, ids)| ids.iter().any(other))
    }
    /// [`LockTable::conflicts`] of a single key, without making it a span
    /// (every put asks).
    fn key_conflicts(&self, key: &[u8], except: Option<&[u8]>) -> bool {
        let other = |id: &TxnId| Some(id.as_slice()) != except;
        self.ranges
            .iter()
            .any(|(s, id)| other(id) && s.contains(key))
            || self.keys.get(key).is_some_and(|ids| ids.iter().any(other))
    }
    fn add(&mut self, spans: Vec<Span>, id: &[u8]) {
        for s in &spans {
            if s.is_key() {
                self.keys
                    .entry(s.start.clone())
                    .or_default()
                    .push(id.to_vec());
            } else {
                self.ranges.push((s.clone(), id.to_vec()));
            }
        }
        self.by_txn.entry(id.to_vec()).or_default().extend(spans);
    }
    fn release(&mut self, id: &[u8]) {
        let Some(spans) = self.by_txn.remove(id) else {
            return;
        };
        let mut had_range = false;
        for s in spans {
            if !s.is_key() {
                had_range = true;
            } else if let Some(ids) = self.keys.get_mut(&s.start) {
                ids.retain(|t| t.as_slice() != id);
                if ids.is_empty() {
                    self.keys.remove(&s.start);
                }
            }
        }
        if had_range {
            self.ranges.retain(|(_, t)| t.as_slice() != id);
        }
    }
}

/// The shard's applied state: MVCC data plus cross-shard txn bookkeeping.
pub struct ShardState {
    shard: u32,
    router: ShardRouter,
    engine: Rc<dyn Engine>,
    mvcc: Mvcc,
    applied_index: u64,
    intents: BTreeMap<TxnId, PrepareRequest>,
    decisions: HashMap<TxnId, Decision>,
    decision_order: VecDeque<TxnId>,
    locks: LockTable,
    /// Events of the entry being applied (handed to the watch ring).
    events: Vec<WriteEvent>,
    /// Leases known on this shard (every shard knows every lease).
    leases: BTreeMap<i64, LeaseRecord>,
    /// Keys of this shard attached to each lease (derived from MVCC).
    attached: HashMap<i64, BTreeSet<Vec<u8>>>,
    /// Leases being revoked by a prepared txn (exclusive).
    lease_revokers: HashMap<i64, TxnId>,
    /// Leases a prepared txn attaches keys to (shared).
    lease_users: HashMap<i64, BTreeSet<TxnId>>,
    /// Recently revoked leases, oldest first: a registration arriving late
    /// (after its lease was revoked) must not bring the lease back here.
    revoked: VecDeque<i64>,
    /// Revoked lease id → the grant that was revoked.
    revoked_set: HashMap<i64, u64>,
}

/// Revoked lease ids remembered per shard (refusing late registrations).
pub const MAX_REVOKED: usize = 100_000;

const REVOKED_PREFIX: &[u8] = b"Srevoked/";

/// Engine key of a lease record.
fn lease_record_key(id: i64) -> Vec<u8> {
    let mut k = LEASE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

const LEASE_PREFIX: &[u8] = b"Slease/";

fn lease_not_found() -> Body {
    error(Code::LeaseNotFound, "etcdserver: requested lease not found")
}

/// Leases the puts of `t` (any branch, any depth) attach keys to, with the
/// keys they would be attached to.
fn put_leases(t: &TxnRequest, out: &mut Vec<(i64, Vec<u8>)>) {
    txn::for_each_op(&t.success, &mut |op| put_lease(op, out));
    txn::for_each_op(&t.failure, &mut |op| put_lease(op, out));
}

/// Whether a range of `t` (any branch) reads at a revision below `rev`.
fn reads_below(t: &TxnRequest, rev: i64) -> bool {
    use metastore_proto::etcdserverpb::request_op::Request;
    let mut below = false;
    let mut check = |op: &RequestOp| {
        if let Some(Request::RequestRange(r)) = &op.request {
            below |= r.revision > 0 && r.revision < rev;
        }
    };
    txn::for_each_op(&t.success, &mut check);
    txn::for_each_op(&t.failure, &mut check);
    below
}

fn put_lease(op: &RequestOp, out: &mut Vec<(i64, Vec<u8>)>) {
    use metastore_proto::etcdserverpb::request_op::Request;
    if let Some(Request::RequestPut(p)) = &op.request {
        if p.lease != 0 && !p.ignore_lease {
            out.push((p.lease, p.key.to_vec()));
        }
    }
}

fn error(code: Code, message: impl Into<String>) -> Body {
    Body::Error(ShardError {
        code: code as i32,
        message: message.into(),
    })
}

fn conflict() -> Body {
    error(
        Code::Conflict,
        "key locked by a prepared cross-shard transaction",
    )
}

/// The shard protocol error for an MVCC error, or `Err` if the shard must
/// stop.
pub fn mvcc_error(e: MvccError) -> Result<Body, StateError> {
    Ok(match e {
        MvccError::Compacted => error(
            Code::Compacted,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        MvccError::FutureRevision => error(
            Code::FutureRevision,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        MvccError::KeyNotFound => error(Code::InvalidArgument, "etcdserver: key not found"),
        MvccError::InvalidRequest(m) => error(Code::InvalidArgument, m),
        // Refused without changing anything (a key already has a newer
        // version); the shard keeps serving.
        e @ MvccError::StaleRevision { .. } => error(Code::Internal, e.to_string()),
        other => return Err(other.into()),
    })
}

impl ShardState {
    /// Loads the state of shard `shard` (of `router`'s shards) from `engine`.
    pub fn open(
        shard: u32,
        router: ShardRouter,
        engine: Rc<dyn Engine>,
    ) -> Result<Self, StateError> {
        let mvcc = Mvcc::open(engine.clone())?;
        let applied_index = match engine.get(APPLIED_KEY)? {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b.as_slice().try_into().unwrap()),
            Some(_) => return Err(StateError::Corrupt("applied index".into())),
            None => 0,
        };
        let mut state = ShardState {
            shard,
            router,
            engine: engine.clone(),
            mvcc,
            applied_index,
            intents: BTreeMap::new(),
            decisions: HashMap::new(),
            decision_order: VecDeque::new(),
            locks: LockTable::default(),
            events: Vec::new(),
            leases: BTreeMap::new(),
            attached: HashMap::new(),
            lease_revokers: HashMap::new(),
            lease_users: HashMap::new(),
            revoked: VecDeque::new(),
            revoked_set: Default::default(),
        };
        let mut revoked = Vec::new();
        let mut end = REVOKED_PREFIX.to_vec();
        *end.last_mut().unwrap() += 1;
        engine.scan(REVOKED_PREFIX, &end, &mut |_, v| {
            if v.len() == 24 {
                let seq = u64::from_be_bytes(v[..8].try_into().unwrap());
                let id = i64::from_be_bytes(v[8..16].try_into().unwrap());
                let grant = u64::from_be_bytes(v[16..].try_into().unwrap());
                revoked.push((seq, id, grant));
            }
            true
        })?;
        revoked.sort();
        for (_, id, grant) in revoked {
            state.revoked.push_back(id);
            state.revoked_set.insert(id, grant);
        }
        let mut records = Vec::new();
        let mut end = LEASE_PREFIX.to_vec();
        *end.last_mut().unwrap() += 1;
        engine.scan(LEASE_PREFIX, &end, &mut |_, v| {
            records.push(v.to_vec());
            true
        })?;
        for v in records {
            let r = LeaseRecord::decode(v.as_slice())
                .map_err(|e| StateError::Corrupt(e.to_string()))?;
            state.leases.insert(r.id, r);
        }
        let mut attached: HashMap<i64, BTreeSet<Vec<u8>>> = HashMap::new();
        state.mvcc.for_each_live(&[0], &[0], &mut |kv| {
            if kv.lease != 0 {
                attached
                    .entry(kv.lease)
                    .or_default()
                    .insert(kv.key.to_vec());
            }
            true
        })?;
        state.attached = attached;
        let mut intents = Vec::new();
        engine.scan(
            &[keyspace::SHARD_INTENT],
            &[keyspace::SHARD_INTENT + 1],
            &mut |k, v| {
                intents.push((k[1..].to_vec(), v.to_vec()));
                true
            },
        )?;
        for (id, v) in intents {
            let intent =
                Intent::decode(v.as_slice()).map_err(|e| StateError::Corrupt(e.to_string()))?;
            let prep = intent.prepare.unwrap_or_default();
            let spans = state.intent_spans(&prep);
            state.locks.add(spans, &id);
            state.lock_leases(&prep, &id);
            state.intents.insert(id, prep);
        }
        let mut decisions = Vec::new();
        engine.scan(
            &[keyspace::SHARD_DECISION],
            &[keyspace::SHARD_DECISION + 1],
            &mut |k, v| {
                decisions.push((k[1..].to_vec(), v.to_vec()));
                true
            },
        )?;
        for (id, v) in decisions {
            let d =
                Decision::decode(v.as_slice()).map_err(|e| StateError::Corrupt(e.to_string()))?;
            state.decision_order.push_back(id.clone());
            state.decisions.insert(id, d);
        }
        Ok(state)
    }

    pub fn shard(&self) -> u32 {
        self.shard
    }
    pub fn router(&self) -> ShardRouter {
        self.router
    }
    pub fn mvcc(&self) -> &Mvcc {
        &self.mvcc
    }
    pub fn mvcc_mut(&mut self) -> &mut Mvcc {
        &mut self.mvcc
    }
    pub fn engine(&self) -> &Rc<dyn Engine> {
        &self.engine
    }
    pub fn applied_index(&self) -> u64 {
        self.applied_index
    }
    /// Prepared, undecided transactions on this shard.
    pub fn intents(&self) -> &BTreeMap<TxnId, PrepareRequest> {
        &self.intents
    }
    /// The primary's decision for `id`, if it has one.
    pub fn decision(&self, id: &[u8]) -> Option<&Decision> {
        self.decisions.get(id)
    }

    /// Whether this shard owns `key`.
    pub fn owns(&self, key: &[u8]) -> bool {
        self.router.owns(self.shard, key)
    }

    /// The spans of `txn` that concern this shard: owned single keys and
    /// every range.
    fn spans_of(&self, t: &TxnRequest) -> Vec<Span> {
        txn::touched_ranges(t)
            .into_iter()
            .filter(|(k, e)| !e.is_empty() || self.owns(k))
            .map(|(k, e)| Span::new(k, e))
            .collect()
    }

    /// What a prepared intent locks: the ranges its txn touches here, and
    /// the keys of the leases it revokes (deleted at its commit). Also
    /// rebuilt from a stored intent on open: while it is prepared no key
    /// joins or leaves a revoked lease (the lease is locked too).
    fn intent_spans(&self, prep: &PrepareRequest) -> Vec<Span> {
        let mut spans = self.spans_of(prep.txn.as_ref().unwrap_or(&TxnRequest::default()));
        for lease in &prep.revoke_leases {
            for key in self.lease_keys(*lease) {
                spans.push(Span::new(&key, &[]));
            }
        }
        spans
    }

    fn locked(&self, spans: &[Span], except: Option<&[u8]>) -> bool {
        spans.iter().any(|s| self.locks.conflicts(s, except))
    }

    /// Whether every key `txn` touches is owned by this shard (the
    /// single-shard fast path may only carry such txns).
    pub fn owns_all(&self, t: &TxnRequest) -> bool {
        self.router.shard_count() == 1
            || txn::touched_ranges(t)
                .iter()
                .all(|(k, e)| e.is_empty() && self.owns(k))
    }

    /// Applies the committed entry `index` carrying `cmd`; returns the
    /// answer for whoever proposed it. The events it produced (all of one
    /// revision, in order, each with its previous version, read or named)
    /// — the one source of watch events, whatever the engine — are then
    /// taken with [`ShardState::take_events`], which leaves their vector
    /// to the next entry.
    pub fn apply(&mut self, index: u64, cmd: &RaftCommand) -> Result<Body, StateError> {
        let mut batch = WriteBatch::default();
        if self.events.capacity() > KEPT_EVENTS {
            // A large delete's vector is not kept for the puts after it.
            self.events = Vec::new();
        }
        self.events.clear();
        let body = self.apply_op(cmd, &mut batch)?;
        batch.put(APPLIED_KEY, index.to_be_bytes());
        self.engine.write(batch, false)?;
        self.applied_index = index;
        self.track_attachments();
        Ok(body)
    }

    /// The events of the entry applied last, in order (see
    /// [`ShardState::apply`]).
    pub fn take_events(&mut self) -> std::vec::Drain<'_, WriteEvent> {
        self.events.drain(..)
    }

    /// Keeps `attached` in step with the events just applied.
    fn track_attachments(&mut self) {
        for we in &self.events {
            let prev_lease = we.prev_lease();
            if prev_lease != 0 {
                if let Some(keys) = self.attached.get_mut(&prev_lease) {
                    keys.remove(we.key());
                    if keys.is_empty() {
                        self.attached.remove(&prev_lease);
                    }
                }
            }
            let is_put = we.kind == metastore_proto::mvccpb::event::EventType::Put;
            if is_put && we.kv.lease != 0 {
                self.attached
                    .entry(we.kv.lease)
                    .or_default()
                    .insert(we.kv.key.to_vec());
            }
        }
    }

    /// The leases this shard knows.
    pub fn leases(&self) -> &BTreeMap<i64, LeaseRecord> {
        &self.leases
    }

    /// Keys of this shard attached to lease `id`.
    pub fn lease_keys(&self, id: i64) -> Vec<Vec<u8>> {
        self.attached
            .get(&id)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// etcd's checks of the puts on a txn's path before it applies any
    /// (`checkRequestPut`), in op order: a put with `ignore_value` or
    /// `ignore_lease` of a key that does not exist ("key not found"), a
    /// put naming an unknown lease ("requested lease not found"), and ours:
    /// a lease being revoked (CONFLICT). Ops on the branches the txn does
    /// not take are not checked, as in etcd.
    fn path_put_refusal(&self, t: &TxnRequest, path: &[bool]) -> Result<Option<Body>, StateError> {
        use metastore_proto::etcdserverpb::request_op::Request;
        let at = self.mvcc.current_revision().max(1);
        let mut refusal = Ok(None);
        txn::ops_along_path(t, path, &mut |op| {
            let Some(Request::RequestPut(p)) = &op.request else {
                return;
            };
            if !matches!(refusal, Ok(None)) || !self.owns(&p.key) {
                return;
            }
            refusal = if p.ignore_value || p.ignore_lease {
                match self.mvcc.get(&p.key, at) {
                    Ok(None) => mvcc_error(MvccError::KeyNotFound).map(Some),
                    Ok(Some(_)) if p.ignore_lease => Ok(None),
                    Ok(Some(_)) => Ok(self.lease_refusal(p.lease)),
                    Err(e) => Err(e.into()),
                }
            } else {
                Ok(self.lease_refusal(p.lease))
            };
        });
        refusal
    }

    /// Why a put naming `lease` is refused: unknown (etcd's
    /// ErrLeaseNotFound) or being revoked (CONFLICT). `None` for no lease.
    fn lease_refusal(&self, lease: i64) -> Option<Body> {
        if lease == 0 {
            None
        } else if !self.leases.contains_key(&lease) {
            Some(lease_not_found())
        } else if self.lease_revokers.contains_key(&lease) {
            Some(conflict())
        } else {
            None
        }
    }

    /// The leases of `uses` on this shard's keys that it does not know.
    fn missing_leases(&self, uses: &[(i64, Vec<u8>)]) -> Vec<i64> {
        let mut missing: Vec<i64> = uses
            .iter()
            .filter(|(lease, key)| self.owns(key) && !self.leases.contains_key(lease))
            .map(|(lease, _)| *lease)
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing
    }

    /// This shard's keys that puts with `ignore_value` or `ignore_lease` in
    /// `t` (any branch) name and that do not exist now.
    fn missing_ignore_keys<'a>(&self, t: &'a TxnRequest) -> Result<Vec<Vec<u8>>, StateError> {
        use metastore_proto::etcdserverpb::request_op::Request;
        let mut keys: Vec<&'a [u8]> = Vec::new();
        let mut ignoring = |op: &'a RequestOp| {
            if let Some(Request::RequestPut(p)) = &op.request {
                if p.ignore_value || p.ignore_lease {
                    keys.push(&p.key);
                }
            }
        };
        txn::for_each_op(&t.success, &mut ignoring);
        txn::for_each_op(&t.failure, &mut ignoring);
        let at = self.mvcc.current_revision().max(1);
        let mut missing = Vec::new();
        for key in keys {
            if self.owns(key) && self.mvcc.get(key, at)?.is_none() {
                missing.push(key.to_vec());
            }
        }
        missing.sort();
        missing.dedup();
        Ok(missing)
    }

    /// CONFLICT if a lease of `uses` on this shard's keys is being revoked
    /// by a txn other than `except`.
    fn revoked_lease_conflict(
        &self,
        uses: &[(i64, Vec<u8>)],
        except: Option<&[u8]>,
    ) -> Option<Body> {
        uses.iter()
            .filter(|(_, key)| self.owns(key))
            .any(|(lease, _)| {
                self.lease_revokers
                    .get(lease)
                    .is_some_and(|holder| Some(holder.as_slice()) != except)
            })
            .then(conflict)
    }

    fn lock_leases(&mut self, prep: &PrepareRequest, id: &[u8]) {
        for lease in &prep.revoke_leases {
            self.lease_revokers.insert(*lease, id.to_vec());
        }
        let mut uses = Vec::new();
        put_leases(
            prep.txn.as_ref().unwrap_or(&TxnRequest::default()),
            &mut uses,
        );
        for (lease, key) in uses {
            if self.owns(&key) {
                self.lease_users
                    .entry(lease)
                    .or_default()
                    .insert(id.to_vec());
            }
        }
    }

    fn unlock_leases(&mut self, id: &[u8]) {
        self.lease_revokers
            .retain(|_, holder| holder.as_slice() != id);
        self.lease_users.retain(|_, holders| {
            holders.remove(id);
            !holders.is_empty()
        });
    }

    fn apply_lease_register(&mut self, req: &LeaseRegisterRequest, batch: &mut WriteBatch) -> Body {
        if !req.home && self.lease_revokers.contains_key(&req.id) {
            // A prepared revocation of the id holds it here: its commit
            // would drop this registration's record (a new grant's) too.
            return conflict();
        }
        if let Some(&grant) = self.revoked_set.get(&req.id) {
            if !req.home && grant == req.grant {
                // The revoked grant's own registration, arriving late.
                return lease_not_found();
            }
            // A new grant of the id.
            self.forget_revoked(req.id, batch);
        }
        match self.leases.entry(req.id) {
            std::collections::btree_map::Entry::Occupied(_) if req.home => {
                return error(Code::LeaseExists, "etcdserver: lease already exists");
            }
            std::collections::btree_map::Entry::Occupied(_) => {}
            std::collections::btree_map::Entry::Vacant(slot) => {
                let record = LeaseRecord {
                    id: req.id,
                    ttl: req.ttl,
                    home: req.home,
                    grant: req.grant,
                };
                batch.put(lease_record_key(req.id), record.encode_to_vec());
                slot.insert(record);
            }
        }
        Body::LeaseRegister(LeaseRegisterResponse { ttl: req.ttl })
    }

    fn revoked_key(id: i64) -> Vec<u8> {
        let mut k = REVOKED_PREFIX.to_vec();
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn remember_revoked(&mut self, id: i64, grant: u64, batch: &mut WriteBatch) {
        if self.revoked_set.insert(id, grant).is_some() {
            self.revoked.retain(|r| *r != id);
        }
        self.revoked.push_back(id);
        let seq = self.applied_index;
        let mut v = seq.to_be_bytes().to_vec();
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(&grant.to_be_bytes());
        batch.put(Self::revoked_key(id), v);
        while self.revoked.len() > MAX_REVOKED {
            let old = self.revoked.pop_front().unwrap();
            self.revoked_set.remove(&old);
            batch.delete(Self::revoked_key(old));
        }
    }

    fn forget_revoked(&mut self, id: i64, batch: &mut WriteBatch) {
        if self.revoked_set.remove(&id).is_some() {
            self.revoked.retain(|r| *r != id);
            batch.delete(Self::revoked_key(id));
        }
    }

    /// Records that `index` was applied without a command (raft's empty
    /// entries, configuration changes).
    pub fn apply_noop(&mut self, index: u64) -> Result<(), StateError> {
        let mut batch = WriteBatch::default();
        batch.put(APPLIED_KEY, index.to_be_bytes());
        self.engine.write(batch, false)?;
        self.applied_index = index;
        Ok(())
    }

    fn header(rev: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision: rev,
            ..Default::default()
        })
    }

    fn apply_op(&mut self, cmd: &RaftCommand, batch: &mut WriteBatch) -> Result<Body, StateError> {
        let rev = cmd.revision;
        let Some(op) = &cmd.op else {
            return Ok(error(Code::InvalidArgument, "empty command"));
        };
        match op {
            Op::Put(req) => self.apply_put(req, rev, batch),
            Op::DeleteRange(req) => self.apply_delete(req, rev, batch),
            Op::Txn(req) => self.apply_txn(req, rev, batch),
            Op::Prepare(req) => self.apply_prepare(req, batch),
            Op::Commit(req) => self.apply_commit(req, rev, batch),
            Op::Abort(req) => Ok(self.apply_abort(&req.txn_id, batch)),
            Op::LeaseRegister(req) => Ok(self.apply_lease_register(req, batch)),
            Op::ForgetDecisions(req) => {
                self.forget_decisions(&req.txn_ids, batch);
                // Nothing to answer: the shard proposes this itself.
                Ok(Body::Abort(AbortResponse {}))
            }
            Op::Compact(req) => {
                // A prepared txn was promised its reads (the coordinator
                // checked them against the compacted revision of its
                // prepare): compacting under them waits for it.
                if self
                    .intents
                    .values()
                    .filter_map(|p| p.txn.as_ref())
                    .any(|t| reads_below(t, req.revision))
                {
                    return Ok(conflict());
                }
                // The revision is global: this shard may not have seen a
                // write that recent, yet must refuse reads below it.
                if req.revision > self.mvcc.current_revision() {
                    batch.extend(self.mvcc.set_current_revision(req.revision));
                }
                match self.mvcc.compact(req.revision) {
                    Ok(b) => {
                        batch.extend(b);
                        Ok(Body::Compact(CompactResponse {}))
                    }
                    Err(e) => mvcc_error(e),
                }
            }
        }
    }

    fn apply_put(
        &mut self,
        req: &PutRequest,
        rev: i64,
        batch: &mut WriteBatch,
    ) -> Result<Body, StateError> {
        if self.locks.key_conflicts(&req.key, None) {
            return Ok(conflict());
        }
        if !req.ignore_lease {
            if let Some(refusal) = self.lease_refusal(req.lease) {
                return Ok(refusal);
            }
        }
        let mut w = self.mvcc.write(rev);
        match w.put(req) {
            Ok(mut resp) => {
                w.finish_into(batch, &mut self.events);
                resp.header = Self::header(rev);
                Ok(Body::Put(resp))
            }
            Err(e) => mvcc_error(e),
        }
    }

    fn apply_delete(
        &mut self,
        req: &DeleteRangeRequest,
        rev: i64,
        batch: &mut WriteBatch,
    ) -> Result<Body, StateError> {
        if self.locked(&[Span::new(&req.key, &req.range_end)], None) {
            return Ok(conflict());
        }
        let (shard, router) = (self.shard, self.router);
        let owns = move |k: &[u8]| router.owns(shard, k);
        let mut w = self.mvcc.write(rev);
        match w.delete_range(req, &owns) {
            Ok(mut resp) => {
                w.finish_into(batch, &mut self.events);
                resp.header = Self::header(rev);
                Ok(Body::DeleteRange(resp))
            }
            Err(e) => mvcc_error(e),
        }
    }

    /// The path of `t` evaluated against this shard's latest state.
    fn local_path(&self, t: &TxnRequest) -> Result<Result<Vec<bool>, Body>, StateError> {
        let (shard, router) = (self.shard, self.router);
        let owns = move |k: &[u8]| router.owns(shard, k);
        match self
            .mvcc
            .evaluate_compares(t, self.mvcc.current_revision().max(1), &owns)
        {
            Ok(outcomes) => Ok(Ok(txn::path(t, &txn::combine_outcomes(&[outcomes])))),
            Err(e) => Ok(Err(mvcc_error(e)?)),
        }
    }

    fn apply_txn(
        &mut self,
        t: &TxnRequest,
        rev: i64,
        batch: &mut WriteBatch,
    ) -> Result<Body, StateError> {
        if !self.owns_all(t) {
            return Ok(error(
                Code::InvalidArgument,
                "txn touches keys of other shards",
            ));
        }
        if self.locked(&self.spans_of(t), None) {
            return Ok(conflict());
        }
        let path = match self.local_path(t)? {
            Ok(p) => p,
            Err(body) => return Ok(body),
        };
        if let Some(refusal) = self.path_put_refusal(t, &path)? {
            return Ok(refusal);
        }
        let (shard, router) = (self.shard, self.router);
        let owns = move |k: &[u8]| router.owns(shard, k);
        let mut w = self.mvcc.write(rev);
        match w.txn(t, &path, &owns) {
            Ok(mut resp) => {
                w.finish_into(batch, &mut self.events);
                resp.header = Self::header(rev);
                Ok(Body::Txn(resp))
            }
            Err(e) => mvcc_error(e),
        }
    }

    fn apply_prepare(
        &mut self,
        req: &PrepareRequest,
        batch: &mut WriteBatch,
    ) -> Result<Body, StateError> {
        let id = req.txn_id.clone();
        if let Some(d) = self.decisions.get(&id) {
            if !d.committed {
                return Ok(error(Code::TxnAborted, "transaction was aborted"));
            }
        }
        let t = req.txn.clone().unwrap_or_default();
        let (shard, router) = (self.shard, self.router);
        let owns = move |k: &[u8]| router.owns(shard, k);
        let mut uses = Vec::new();
        put_leases(&t, &mut uses);
        if !self.intents.contains_key(&id) {
            let spans = self.intent_spans(req);
            for lease in &req.revoke_leases {
                let used = self
                    .lease_users
                    .get(lease)
                    .is_some_and(|u| u.iter().any(|holder| holder != &id));
                let revoking = self
                    .lease_revokers
                    .get(lease)
                    .is_some_and(|holder| holder != &id);
                if used || revoking {
                    return Ok(conflict());
                }
            }
            if self.locked(&spans, Some(&id)) {
                return Ok(conflict());
            }
            // An unknown lease is the coordinator's to judge, once it knows
            // the path (`missing_leases` below).
            if let Some(refusal) = self.revoked_lease_conflict(&uses, Some(&id)) {
                return Ok(refusal);
            }
            self.locks.add(spans, &id);
            self.lock_leases(req, &id);
            self.intents.insert(id.clone(), req.clone());
            let mut key = vec![keyspace::SHARD_INTENT];
            key.extend_from_slice(&id);
            let intent = Intent {
                prepare: Some(req.clone()),
            };
            batch.put(key, intent.encode_to_vec());
        }
        match self
            .mvcc
            .evaluate_compares(&t, self.mvcc.current_revision().max(1), &owns)
        {
            Ok(outcomes) => {
                // What etcd would refuse the txn for if its path holds the
                // op: the coordinator judges once it knows the path (see
                // `PrepareResponse`). The keys and leases stay as they are
                // until commit: the keys are locked, the leases held.
                Ok(Body::Prepare(PrepareResponse {
                    outcomes,
                    missing_leases: self.missing_leases(&uses),
                    missing_keys: self.missing_ignore_keys(&t)?,
                    compacted_revision: self.mvcc.compacted_revision(),
                }))
            }
            Err(e) => mvcc_error(e),
        }
    }

    fn apply_commit(
        &mut self,
        req: &CommitRequest,
        rev: i64,
        batch: &mut WriteBatch,
    ) -> Result<Body, StateError> {
        let id = &req.txn_id;
        let Some(prep) = self.intents.get(id).cloned() else {
            // Already resolved here: answer idempotently, marked as a
            // repeat (the results went with the first answer).
            return Ok(match self.decisions.get(id) {
                Some(d) if d.committed => Body::Commit(CommitResponse {
                    txn: Some(TxnResponse::default()),
                    revision: d.revision,
                    repeated: true,
                }),
                Some(_) => error(Code::TxnAborted, "transaction was aborted"),
                None if req.revision != 0 => Body::Commit(CommitResponse {
                    txn: Some(TxnResponse::default()),
                    revision: req.revision,
                    repeated: true,
                }),
                None => error(Code::TxnAborted, "transaction is not prepared"),
            });
        };
        let primary = prep.primary == self.shard;
        let rev = if primary { rev } else { req.revision };
        if rev <= 0 {
            return Ok(error(Code::InvalidArgument, "commit without a revision"));
        }
        let t = prep.txn.clone().unwrap_or_default();
        let (shard, router) = (self.shard, self.router);
        let owns = move |k: &[u8]| router.owns(shard, k);
        let mut w = self.mvcc.write(rev);
        let resp = match w.txn(&t, &req.path, &owns) {
            Ok(r) => r,
            Err(e) => return mvcc_error(e),
        };
        // Revoked leases: their keys go at this same revision.
        for lease in &prep.revoke_leases {
            for key in self.attached.get(lease).cloned().unwrap_or_default() {
                let del = DeleteRangeRequest {
                    key,
                    ..Default::default()
                };
                if let Err(e) = w.delete_range(&del, &owns) {
                    return mvcc_error(e);
                }
            }
        }
        w.finish_into(batch, &mut self.events);
        for (n, lease) in prep.revoke_leases.iter().enumerate() {
            let grant = match self.leases.remove(lease) {
                Some(record) => {
                    batch.delete(lease_record_key(*lease));
                    record.grant
                }
                // Its registration has not come yet: remembered under the
                // home's grant, so that registration is refused.
                None => prep.revoke_grants.get(n).copied().unwrap_or(0),
            };
            self.remember_revoked(*lease, grant, batch);
        }
        self.forget_intent(id, batch);
        if primary {
            self.record_decision(
                id,
                Decision {
                    committed: true,
                    revision: rev,
                    path: req.path.clone(),
                },
                batch,
            );
        }
        Ok(Body::Commit(CommitResponse {
            txn: Some(TxnResponse {
                header: Self::header(rev),
                ..resp
            }),
            revision: rev,
            repeated: false,
        }))
    }

    fn apply_abort(&mut self, id: &[u8], batch: &mut WriteBatch) -> Body {
        if let Some(d) = self.decisions.get(id) {
            if d.committed {
                return error(Code::InvalidArgument, "transaction already committed");
            }
            return Body::Abort(AbortResponse {});
        }
        let was_primary = self
            .intents
            .get(id)
            .map(|p| p.primary == self.shard)
            .unwrap_or(true);
        self.forget_intent(id, batch);
        if was_primary {
            // Recorded so that a late prepare or commit of this txn is
            // refused here.
            self.record_decision(id, Decision::default(), batch);
        }
        Body::Abort(AbortResponse {})
    }

    fn forget_intent(&mut self, id: &[u8], batch: &mut WriteBatch) {
        if self.intents.remove(id).is_some() {
            self.locks.release(id);
            self.unlock_leases(id);
            let mut key = vec![keyspace::SHARD_INTENT];
            key.extend_from_slice(id);
            batch.delete(key);
        }
    }

    fn record_decision(&mut self, id: &[u8], d: Decision, batch: &mut WriteBatch) {
        let mut key = vec![keyspace::SHARD_DECISION];
        key.extend_from_slice(id);
        batch.put(key, d.encode_to_vec());
        if self.decisions.insert(id.to_vec(), d).is_none() {
            self.decision_order.push_back(id.to_vec());
        }
        while self.decisions.len() > MAX_DECISIONS {
            // Forgotten ids may linger in the order: skipped here.
            let Some(old) = self.decision_order.pop_front() else {
                break;
            };
            if self.decisions.remove(&old).is_some() {
                let mut key = vec![keyspace::SHARD_DECISION];
                key.extend_from_slice(&old);
                batch.delete(key);
            }
        }
    }

    /// Drops the decisions of `ids` (those it holds).
    fn forget_decisions(&mut self, ids: &[Vec<u8>], batch: &mut WriteBatch) {
        for id in ids {
            if self.decisions.remove(id).is_some() {
                let mut key = vec![keyspace::SHARD_DECISION];
                key.extend_from_slice(id);
                batch.delete(key);
            }
        }
        // The order keeps forgotten ids until it outgrows the decisions.
        if self.decision_order.len() > 2 * self.decisions.len() + 1024 {
            let decisions = &self.decisions;
            self.decision_order.retain(|id| decisions.contains_key(id));
        }
    }

    /// The ids of every decision this shard holds.
    pub fn decision_ids(&self) -> impl Iterator<Item = &TxnId> {
        self.decisions.keys()
    }
}

#[cfg(test)]
mod tests {
    //! Scripted two-phase-commit scenarios: two shards' state machines
    //! driven entry by entry, no raft and no network, on both engines,
    //! including "crashes" (reopening a state from its engine) between
    //! steps.
    use super::*;

    /// The lock rule the table must keep: a span conflicts with every
    /// overlapping span held by another txn. Spans as (start, end) with
    /// etcd's conventions; the reference bounds a key `k` by `k\0`.
    type RawSpan = (Vec<u8>, Vec<u8>);

    fn reference_overlaps(a: &RawSpan, b: &RawSpan) -> bool {
        let upper = |s: &RawSpan| -> Option<Vec<u8>> {
            if s.1.is_empty() {
                Some([s.0.as_slice(), &[0]].concat())
            } else if s.1 == [0] {
                None
            } else {
                Some(s.1.clone())
            }
        };
        let below =
            |x: &(Vec<u8>, Vec<u8>), y: &(Vec<u8>, Vec<u8>)| upper(x).is_some_and(|u| u <= y.0);
        !(below(a, b) || below(b, a))
    }

    #[test]
    fn lock_table_matches_a_list_of_spans() {
        // Keys over a small alphabet so that spans meet often, including
        // keys that are prefixes of others and "\0"-suffixed neighbours.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let key = |next: &mut dyn FnMut(u64) -> u64| -> Vec<u8> {
            (0..next(3))
                .map(|_| [0u8, b'a', b'b'][next(3) as usize])
                .collect()
        };
        let mut table = LockTable::default();
        let mut held: Vec<(RawSpan, TxnId)> = Vec::new();
        for step in 0..4000 {
            let start = key(&mut next);
            let end = match next(4) {
                0 | 1 => Vec::new(),
                2 => vec![0],
                _ => key(&mut next),
            };
            let span = (start, end);
            let id = vec![next(6) as u8];
            let except = (next(2) == 0).then(|| id.clone());
            let want = held.iter().any(|(s, t)| {
                Some(t.as_slice()) != except.as_deref() && reference_overlaps(s, &span)
            });
            let got = table.conflicts(&Span::new(&span.0, &span.1), except.as_deref());
            assert_eq!(
                got, want,
                "step {step}: {span:?} except {except:?} over {held:?}"
            );
            match next(3) {
                0 => {
                    table.release(&id);
                    held.retain(|(_, t)| *t != id);
                }
                _ if !got => {
                    table.add(vec![Span::new(&span.0, &span.1)], &id);
                    held.push((span, id));
                }
                _ => {}
            }
        }
        for id in 0..6u8 {
            table.release(&[id]);
        }
        assert!(table.keys.is_empty() && table.ranges.is_empty() && table.by_txn.is_empty());
    }
    use crate::engine::{open, EngineKind};
    use metastore_proto::etcdserverpb::{
        compare, request_op, Compare, PutRequest, RangeRequest, RequestOp,
    };
    use metastore_proto::shardpb::{
        AbortRequest, CommitRequest, CompactRequest, ForgetDecisionsRequest, LeaseRegisterRequest,
        PrepareRequest,
    };

    struct Cluster {
        router: ShardRouter,
        engines: Vec<Rc<dyn Engine>>,
        states: Vec<ShardState>,
        index: u64,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl Cluster {
        fn new(kind: EngineKind) -> Self {
            let router = ShardRouter::new(2);
            let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
            let engines: Vec<Rc<dyn Engine>> =
                dirs.iter().map(|d| open(kind, d.path()).unwrap()).collect();
            let states = (0..2)
                .map(|i| ShardState::open(i, router, engines[i as usize].clone()).unwrap())
                .collect();
            Cluster {
                router,
                engines,
                states,
                index: 0,
                _dirs: dirs,
            }
        }
        /// Drops the in-memory state and reloads it from the engine, as a
        /// restart does once the log has been replayed.
        fn crash(&mut self) {
            self.states = (0..2)
                .map(|i| {
                    ShardState::open(i, self.router, self.engines[i as usize].clone()).unwrap()
                })
                .collect();
        }
        fn apply(&mut self, shard: usize, revision: i64, op: Op) -> Body {
            self.index += 1;
            let cmd = RaftCommand {
                revision,
                proposal_id: 0,
                op: Some(op),
            };
            self.states[shard].apply(self.index, &cmd).unwrap()
        }
        /// A key owned by `shard`.
        fn key(&self, shard: u32, tag: &str) -> Vec<u8> {
            (0..)
                .map(|i| format!("{tag}{i}").into_bytes())
                .find(|k| self.router.shard_of(k) == shard)
                .unwrap()
        }
        fn get(&self, key: &[u8], rev: i64) -> Option<Vec<u8>> {
            let s = &self.states[self.router.shard_of(key) as usize];
            let router = self.router;
            let id = s.shard();
            let r = s
                .mvcc()
                .range(
                    &RangeRequest {
                        key: key.to_vec(),
                        ..Default::default()
                    },
                    rev,
                    &move |k: &[u8]| router.owns(id, k),
                )
                .unwrap();
            r.kvs.first().map(|kv| kv.value.to_vec())
        }
    }

    fn put(key: &[u8], value: &str) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest {
                key: key.to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }

    fn version_is(key: &[u8], v: i64) -> Compare {
        Compare {
            key: key.to_vec(),
            target: compare::CompareTarget::Version as i32,
            result: compare::CompareResult::Equal as i32,
            target_union: Some(compare::TargetUnion::Version(v)),
            ..Default::default()
        }
    }

    fn two_key_txn(a: &[u8], b: &[u8]) -> TxnRequest {
        TxnRequest {
            compare: vec![version_is(a, 0), version_is(b, 0)],
            success: vec![put(a, "A"), put(b, "B")],
            failure: vec![],
        }
    }

    fn prepare(id: &[u8], t: &TxnRequest) -> Op {
        Op::Prepare(PrepareRequest {
            txn_id: id.to_vec(),
            primary: 0,
            participants: vec![0, 1],
            txn: Some(t.clone()),
            revoke_leases: vec![],
            floor: 0,
            revoke_grants: vec![],
        })
    }

    /// The prepare of revocation `id` of `lease` (home shard 0), known to
    /// its home by `grant`.
    fn revoke_prepare(id: &[u8], lease: i64, grant: u64) -> Op {
        Op::Prepare(PrepareRequest {
            txn_id: id.to_vec(),
            primary: 0,
            participants: vec![0, 1],
            txn: Some(TxnRequest::default()),
            revoke_leases: vec![lease],
            floor: 0,
            revoke_grants: vec![grant],
        })
    }

    fn commit(id: &[u8], path: Vec<bool>, revision: i64) -> Op {
        Op::Commit(CommitRequest {
            txn_id: id.to_vec(),
            path,
            revision,
        })
    }

    fn outcomes(b: Body) -> Vec<metastore_proto::shardpb::CompareOutcome> {
        match b {
            Body::Prepare(p) => p.outcomes,
            other => panic!("expected prepare response, got {other:?}"),
        }
    }

    fn is_code(b: &Body, code: Code) -> bool {
        matches!(b, Body::Error(e) if e.code == code as i32)
    }

    fn each_engine(f: impl Fn(EngineKind)) {
        f(EngineKind::Memory);
        f(EngineKind::RocksDb);
    }

    #[test]
    fn commit_applies_on_both_shards_at_one_revision() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            let t = two_key_txn(&a, &b);
            let o0 = outcomes(c.apply(0, 0, prepare(b"t1", &t)));
            let o1 = outcomes(c.apply(1, 0, prepare(b"t1", &t)));
            let path = txn::path(&t, &txn::combine_outcomes(&[o0, o1]));
            assert_eq!(path, vec![true]);
            match c.apply(0, 10, commit(b"t1", path.clone(), 0)) {
                Body::Commit(r) => assert_eq!(r.revision, 10),
                other => panic!("{other:?}"),
            }
            assert!(c.states[0].decision(b"t1").unwrap().committed);
            c.apply(1, 0, commit(b"t1", path, 10));
            assert_eq!(c.get(&a, 10), Some(b"A".to_vec()));
            assert_eq!(c.get(&b, 10), Some(b"B".to_vec()));
            assert_eq!(c.get(&b, 9), None);
            assert!(c.states[0].intents().is_empty() && c.states[1].intents().is_empty());
        });
    }

    #[test]
    fn prepared_keys_refuse_other_writers_until_resolved() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            let t = two_key_txn(&a, &b);
            c.apply(0, 0, prepare(b"t1", &t));
            c.apply(1, 0, prepare(b"t1", &t));
            // A single-shard put to a locked key is refused, nothing applied.
            let put_a = Op::Put(PutRequest {
                key: a.clone().into(),
                value: b"x".to_vec().into(),
                ..Default::default()
            });
            assert!(is_code(&c.apply(0, 5, put_a.clone()), Code::Conflict));
            assert_eq!(c.get(&a, 5), None);
            // So is another txn's prepare over the same key.
            assert!(is_code(&c.apply(1, 0, prepare(b"t2", &t)), Code::Conflict));
            // Abort releases the locks; the put then goes through.
            c.apply(
                0,
                0,
                Op::Abort(AbortRequest {
                    txn_id: b"t1".to_vec(),
                }),
            );
            c.apply(
                1,
                0,
                Op::Abort(AbortRequest {
                    txn_id: b"t1".to_vec(),
                }),
            );
            assert!(matches!(c.apply(0, 6, put_a), Body::Put(_)));
            assert_eq!(c.get(&a, 6), Some(b"x".to_vec()));
            // The aborted txn can no longer commit at its primary, nor
            // prepare again there.
            assert!(is_code(
                &c.apply(0, 7, commit(b"t1", vec![true], 0)),
                Code::TxnAborted
            ));
            assert!(is_code(
                &c.apply(0, 0, prepare(b"t1", &t)),
                Code::TxnAborted
            ));
        });
    }

    #[test]
    fn compares_are_combined_across_shards() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            // b exists already: its version-is-0 compare fails → failure
            // branch (empty) on both shards.
            c.apply(
                1,
                3,
                Op::Put(PutRequest {
                    key: b.clone().into(),
                    value: b"old".to_vec().into(),
                    ..Default::default()
                }),
            );
            let t = two_key_txn(&a, &b);
            let o0 = outcomes(c.apply(0, 0, prepare(b"t1", &t)));
            let o1 = outcomes(c.apply(1, 0, prepare(b"t1", &t)));
            let path = txn::path(&t, &txn::combine_outcomes(&[o0, o1]));
            assert_eq!(path, vec![false]);
            c.apply(0, 8, commit(b"t1", path.clone(), 0));
            c.apply(1, 0, commit(b"t1", path, 8));
            assert_eq!(c.get(&a, 8), None);
            assert_eq!(c.get(&b, 8), Some(b"old".to_vec()));
        });
    }

    #[test]
    fn crash_between_primary_commit_and_participant_commit() {
        // Durable state only: the rocksdb engine.
        let mut c = Cluster::new(EngineKind::RocksDb);
        let (a, b) = (c.key(0, "a"), c.key(1, "b"));
        let t = two_key_txn(&a, &b);
        c.apply(0, 0, prepare(b"t1", &t));
        c.apply(1, 0, prepare(b"t1", &t));
        c.apply(0, 12, commit(b"t1", vec![true], 0));
        // Coordinator and server die here.
        c.crash();
        // After restart the participant still holds its intent and lock...
        assert!(c.states[1].intents().contains_key(b"t1".as_slice()));
        let put_b = Op::Put(PutRequest {
            key: b.clone().into(),
            value: b"x".to_vec().into(),
            ..Default::default()
        });
        assert!(is_code(&c.apply(1, 13, put_b), Code::Conflict));
        // ...and the primary still knows the decision, which the
        // participant's resolution follows.
        let d = c.states[0].decision(b"t1").unwrap().clone();
        assert!(d.committed);
        assert_eq!(d.revision, 12);
        c.apply(1, 0, commit(b"t1", d.path, d.revision));
        assert_eq!(c.get(&a, 12), Some(b"A".to_vec()));
        assert_eq!(c.get(&b, 12), Some(b"B".to_vec()));
    }

    /// Decisions stay until the shard forgets them by name (through raft),
    /// not when others are made: however many txns follow, a participant
    /// that asks late is told what was decided.
    #[test]
    fn decisions_stay_until_forgotten_by_name() {
        let mut c = Cluster::new(EngineKind::RocksDb);
        let (a, b) = (c.key(0, "a"), c.key(1, "b"));
        let t = two_key_txn(&a, &b);
        for (n, id) in [b"t1", b"t2", b"t3"].iter().enumerate() {
            c.apply(0, 0, prepare(*id, &t));
            let rev = 20 + n as i64;
            assert!(matches!(
                c.apply(0, rev, commit(*id, vec![true], 0)),
                Body::Commit(_)
            ));
        }
        let forget = |ids: &[&[u8]]| {
            Op::ForgetDecisions(ForgetDecisionsRequest {
                txn_ids: ids.iter().map(|id| id.to_vec()).collect(),
            })
        };
        c.apply(0, 0, forget(&[b"t1", b"unknown"]));
        assert!(c.states[0].decision(b"t1").is_none());
        assert_eq!(c.states[0].decision(b"t2").unwrap().revision, 21);
        // Durably: a restart does not bring it back.
        c.crash();
        assert!(c.states[0].decision(b"t1").is_none());
        assert_eq!(c.states[0].decision_ids().count(), 2);
        c.apply(0, 0, forget(&[b"t2", b"t3"]));
        assert_eq!(c.states[0].decision_ids().count(), 0);
    }

    #[test]
    fn crash_before_decision_aborts_everywhere() {
        let mut c = Cluster::new(EngineKind::RocksDb);
        let (a, b) = (c.key(0, "a"), c.key(1, "b"));
        let t = two_key_txn(&a, &b);
        c.apply(0, 0, prepare(b"t1", &t));
        c.apply(1, 0, prepare(b"t1", &t));
        c.crash();
        // The primary resolves its stale intent: abort (no decision yet).
        assert!(c.states[0].decision(b"t1").is_none());
        c.apply(
            0,
            0,
            Op::Abort(AbortRequest {
                txn_id: b"t1".to_vec(),
            }),
        );
        assert!(!c.states[0].decision(b"t1").unwrap().committed);
        // The participant asks and follows; a late commit from the
        // coordinator is refused at the primary.
        c.apply(
            1,
            0,
            Op::Abort(AbortRequest {
                txn_id: b"t1".to_vec(),
            }),
        );
        assert!(is_code(
            &c.apply(0, 20, commit(b"t1", vec![true], 0)),
            Code::TxnAborted
        ));
        assert_eq!(c.get(&a, 20), None);
        assert_eq!(c.get(&b, 20), None);
        assert!(c.states[1].intents().is_empty());
    }

    #[test]
    fn participant_commit_below_its_current_revision() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            let other = c.key(1, "other");
            let t = two_key_txn(&a, &b);
            c.apply(0, 0, prepare(b"t1", &t));
            c.apply(1, 0, prepare(b"t1", &t));
            c.apply(0, 30, commit(b"t1", vec![true], 0));
            // Shard 1 applies an unrelated write at a higher revision
            // before the txn's commit reaches it.
            c.apply(
                1,
                31,
                Op::Put(PutRequest {
                    key: other.clone().into(),
                    value: b"o".to_vec().into(),
                    ..Default::default()
                }),
            );
            c.apply(1, 0, commit(b"t1", vec![true], 30));
            assert_eq!(c.get(&b, 30), Some(b"B".to_vec()));
            assert_eq!(c.get(&other, 30), None);
            assert_eq!(c.get(&other, 31), Some(b"o".to_vec()));
            assert_eq!(c.get(&b, 31), Some(b"B".to_vec()));
        });
    }

    fn register(c: &mut Cluster, id: i64, home: usize, grant: u64) {
        for shard in 0..2 {
            let b = c.apply(
                shard,
                0,
                Op::LeaseRegister(LeaseRegisterRequest {
                    id,
                    ttl: 10,
                    home: shard == home,
                    grant,
                }),
            );
            assert!(matches!(b, Body::LeaseRegister(_)), "{b:?}");
        }
    }

    fn put_leased(key: &[u8], lease: i64) -> Op {
        Op::Put(PutRequest {
            key: key.to_vec().into(),
            value: b"v".to_vec().into(),
            lease,
            ..Default::default()
        })
    }

    fn put_op(req: PutRequest) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestPut(req)),
        }
    }

    /// etcd refuses a txn for a put's unknown lease, or for an
    /// `ignore_value` put of a missing key, only if the put is on the path
    /// the txn takes. One shard checks its path itself; a prepare reports
    /// what it does not know for the coordinator to judge by the path, and
    /// a compaction waits for a prepared txn that reads below it.
    #[test]
    fn lease_and_key_checks_follow_the_path_taken() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            let leased = |key: &[u8]| {
                put_op(PutRequest {
                    key: key.to_vec().into(),
                    lease: 77,
                    ..Default::default()
                })
            };
            // `a` is new: the success branch runs and the unknown lease on
            // the other one does not matter. Then `a` exists: refused.
            let t = TxnRequest {
                compare: vec![version_is(&a, 0)],
                success: vec![put(&a, "A")],
                failure: vec![leased(&a)],
            };
            let first = c.apply(0, 5, Op::Txn(t.clone()));
            assert!(matches!(&first, Body::Txn(r) if r.succeeded), "{first:?}");
            assert!(is_code(&c.apply(0, 6, Op::Txn(t)), Code::LeaseNotFound));
            assert_eq!(c.get(&a, 6), Some(b"A".to_vec()));

            // Across shards each prepare reports what it owns and lacks.
            let ignore_b = put_op(PutRequest {
                key: b.clone().into(),
                ignore_value: true,
                ..Default::default()
            });
            let read_a_at_5 = RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: a.clone(),
                    revision: 5,
                    ..Default::default()
                })),
            };
            let t = TxnRequest {
                compare: vec![],
                success: vec![leased(&a), ignore_b, read_a_at_5],
                failure: vec![],
            };
            let prepared = |body: Body| match body {
                Body::Prepare(p) => (p.missing_leases, p.missing_keys, p.compacted_revision),
                other => panic!("expected a prepare response, got {other:?}"),
            };
            assert_eq!(
                prepared(c.apply(0, 0, prepare(b"t2", &t))),
                (vec![77], vec![], 0)
            );
            assert_eq!(
                prepared(c.apply(1, 0, prepare(b"t2", &t))),
                (vec![], vec![b.clone()], 0)
            );
            // Compacting past the prepared read waits; up to it does not.
            let compact = |revision| Op::Compact(CompactRequest { revision });
            assert!(is_code(&c.apply(0, 0, compact(6)), Code::Conflict));
            assert!(matches!(c.apply(0, 0, compact(5)), Body::Compact(_)));
            for shard in 0..2 {
                c.apply(
                    shard,
                    0,
                    Op::Abort(AbortRequest {
                        txn_id: b"t2".to_vec(),
                    }),
                );
            }
            assert!(matches!(c.apply(0, 0, compact(6)), Body::Compact(_)));
        });
    }

    /// A registration of a new grant on a shard where a revocation of the
    /// same id is prepared waits (CONFLICT) until it is resolved, rather
    /// than be dropped by its commit.
    #[test]
    fn a_registration_waits_for_a_prepared_revocation_of_its_id() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            register(&mut c, 7, 0, 1);
            let prepared = c.apply(1, 0, revoke_prepare(b"r1", 7, 1));
            assert!(matches!(prepared, Body::Prepare(_)), "{kind}: {prepared:?}");
            let again = c.apply(
                1,
                0,
                Op::LeaseRegister(LeaseRegisterRequest {
                    id: 7,
                    ttl: 10,
                    home: false,
                    grant: 2,
                }),
            );
            assert!(is_code(&again, Code::Conflict), "{kind}: {again:?}");
        });
    }

    /// A lease revoked before its registration reached a shard stays
    /// revoked there: the late registration is refused.
    #[test]
    fn a_registration_that_arrives_after_the_revoke_is_refused() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let registration = |home: bool| {
                Op::LeaseRegister(LeaseRegisterRequest {
                    id: 7,
                    ttl: 10,
                    home,
                    grant: 5,
                })
            };
            assert!(matches!(
                c.apply(0, 0, registration(true)),
                Body::LeaseRegister(_)
            ));
            for shard in 0..2 {
                let prepared = c.apply(shard, 0, revoke_prepare(b"r1", 7, 5));
                assert!(matches!(prepared, Body::Prepare(_)), "{kind}: {prepared:?}");
            }
            c.apply(0, 9, commit(b"r1", vec![true], 0));
            c.apply(1, 0, commit(b"r1", vec![true], 9));
            let late = c.apply(1, 0, registration(false));
            assert!(is_code(&late, Code::LeaseNotFound), "{kind}: {late:?}");
            assert!(c.states[1].leases().is_empty());
        });
    }

    /// A revoke prepared before a crash locks the keys it will delete
    /// after the restart too (they are the lease's keys, not the txn's).
    #[test]
    fn a_revoke_prepared_before_a_crash_still_locks_its_keys() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            register(&mut c, 7, 0, 1);
            c.apply(0, 3, put_leased(&a, 7));
            c.apply(1, 4, put_leased(&b, 7));
            for shard in 0..2 {
                let prepared = c.apply(shard, 0, revoke_prepare(b"r1", 7, 1));
                assert!(matches!(prepared, Body::Prepare(_)));
            }
            c.apply(0, 9, commit(b"r1", vec![true], 0));
            c.crash();
            // Keeping the lease (ignore_lease) would slip past the lease's
            // own lock: the key's lock holds it back.
            let keep = c.apply(
                1,
                13,
                Op::Put(PutRequest {
                    key: b.clone().into(),
                    value: b"w".to_vec().into(),
                    ignore_lease: true,
                    ..Default::default()
                }),
            );
            assert!(is_code(&keep, Code::Conflict), "{kind}: {keep:?}");
            let done = c.apply(1, 0, commit(b"r1", vec![true], 9));
            assert!(matches!(done, Body::Commit(_)), "{kind}: {done:?}");
            assert!(c.states[1].intents().is_empty());
            assert_eq!(c.get(&b, 9), None);
        });
    }

    #[test]
    fn lease_revocation_deletes_attached_keys_on_every_shard_at_one_revision() {
        each_engine(|kind| {
            let mut c = Cluster::new(kind);
            let (a, b) = (c.key(0, "a"), c.key(1, "b"));
            // Unknown lease: refused.
            assert!(is_code(
                &c.apply(0, 2, put_leased(&a, 7)),
                Code::LeaseNotFound
            ));
            register(&mut c, 7, 0, 1);
            // The home shard refuses the same id twice.
            let dup = c.apply(
                0,
                0,
                Op::LeaseRegister(LeaseRegisterRequest {
                    id: 7,
                    ttl: 10,
                    home: true,
                    grant: 1,
                }),
            );
            assert!(is_code(&dup, Code::LeaseExists));
            c.apply(0, 3, put_leased(&a, 7));
            c.apply(1, 4, put_leased(&b, 7));
            assert_eq!(c.states[0].lease_keys(7), vec![a.clone()]);
            assert_eq!(c.states[1].lease_keys(7), vec![b.clone()]);
            // Revoke: prepare everywhere (locks the lease), commit at 9.
            let revoke =
                |c: &mut Cluster, shard: usize| c.apply(shard, 0, revoke_prepare(b"r1", 7, 1));
            assert!(matches!(revoke(&mut c, 0), Body::Prepare(_)));
            assert!(matches!(revoke(&mut c, 1), Body::Prepare(_)));
            // A new attachment while revoking waits (conflict).
            let other = c.key(1, "o");
            assert!(is_code(
                &c.apply(1, 5, put_leased(&other, 7)),
                Code::Conflict
            ));
            c.apply(0, 9, commit(b"r1", vec![true], 0));
            c.apply(1, 0, commit(b"r1", vec![true], 9));
            assert_eq!(c.get(&a, 8), Some(b"v".to_vec()));
            assert_eq!(c.get(&b, 8), Some(b"v".to_vec()));
            assert_eq!(c.get(&a, 9), None);
            assert_eq!(c.get(&b, 9), None);
            assert!(c.states.iter().all(|s| s.leases().is_empty()));
            assert!(is_code(
                &c.apply(1, 10, put_leased(&other, 7)),
                Code::LeaseNotFound
            ));
            // A registration of the revoked grant that arrives late does not
            // bring the lease back on that shard...
            let late = c.apply(
                1,
                0,
                Op::LeaseRegister(LeaseRegisterRequest {
                    id: 7,
                    ttl: 10,
                    home: false,
                    grant: 1,
                }),
            );
            assert!(is_code(&late, Code::LeaseNotFound));
            // ...but a new grant of the same id does.
            register(&mut c, 7, 0, 2);
            assert!(matches!(
                c.apply(1, 11, put_leased(&other, 7)),
                Body::Put(_)
            ));
        });
    }

    #[test]
    fn leases_and_attachments_survive_a_restart() {
        let mut c = Cluster::new(EngineKind::RocksDb);
        let a = c.key(1, "a");
        register(&mut c, 42, 1, 1);
        c.apply(1, 2, put_leased(&a, 42));
        c.crash();
        assert!(c.states[1].leases().get(&42).unwrap().home);
        assert!(!c.states[0].leases().get(&42).unwrap().home);
        assert_eq!(c.states[1].lease_keys(42), vec![a.clone()]);
        // Overwriting the key without a lease detaches it.
        c.apply(
            1,
            3,
            Op::Put(PutRequest {
                key: a.clone().into(),
                value: b"w".to_vec().into(),
                ..Default::default()
            }),
        );
        assert!(c.states[1].lease_keys(42).is_empty());
    }
}
