//! etcd's Lease service (Grant, Revoke, KeepAlive, TimeToLive, Leases) over
//! the shards.
//!
//! # Where a lease lives
//!
//! Keys on any shard may be attached to a lease, so every shard knows every
//! lease (a `LeaseRecord`, replicated through each shard's raft log). One
//! shard is the lease's *home*: `router.shard_of(lease_key(id))`. The home
//! shard is the only authority on expiry: it keeps the deadline, refreshed
//! by keep-alives, and when it passes it revokes the lease with one
//! cross-shard transaction that deletes every attached key on every shard at
//! one revision. The gateway therefore talks to the home shard for
//! everything but registration (every shard), the attached keys (every
//! shard holds its own) and the list (every shard lists the leases it is
//! home of).
//!
//! # Grant
//!
//! 1. etcd's checks: `TTL > 9_000_000_000` → OutOfRange "etcdserver: too
//!    large lease TTL"; a TTL below etcd's minimum (2 s with etcd's default
//!    election timeout) is raised to it, and the response says so.
//! 2. ID 0: the gateway picks a random positive ID (etcd only hands out
//!    positive IDs) and picks again if the home shard already has it.
//! 3. Register on the home shard first (`home: true`): it refuses a
//!    duplicate ID (`LEASE_EXISTS` → FailedPrecondition "etcdserver: lease
//!    already exists"). That makes the home shard's record the lease's
//!    existence: a grant that loses a race for an ID fails before it touches
//!    any other shard.
//! 4. Then register on every other shard (`home: false`) in parallel. These
//!    registrations are idempotent (a shard that already knows the lease
//!    accepts), so they are retried with the backend's policy. If one still
//!    fails, the lease is revoked again at home (best effort) and the grant
//!    fails: a lease half registered would refuse puts on some shards.
//!
//! # KeepAlive
//!
//! A bidirectional stream carrying any number of leases. Each request is a
//! renewal on the lease's home shard; the answer carries the lease's TTL, or
//! 0 when the lease is unknown (as etcd). Renewals of one stream run
//! concurrently (up to [`KEEPALIVE_PIPELINE`]) but are answered in request
//! order. A failure other than "unknown lease" ends the stream with that
//! error, as etcd's server does.
//!
//! # TimeToLive and Leases
//!
//! TimeToLive asks the home shard; an unknown lease is answered with
//! `TTL = -1` and no error (etcd 3.5). With `keys`, every shard's attached
//! keys are gathered, merged and sorted. Leases asks every shard for the
//! leases it is home of, with the time each has left; the union is listed
//! soonest to expire first, as etcd lists it.
//!
//! # Headers
//!
//! Revoke reports the revocation's revision; every other answer the current
//! revision (etcd fills lease headers with the store's current revision).
//!
//! # Retries
//!
//! Every shard call is retried on CONFLICT/UNAVAILABLE-like errors with the
//! backend's retry policy ([`Backend::retry`]): CONFLICT here means a
//! revocation (an expiry, say) is under way. Calls that may be repeated
//! safely (reads, renewals, the non-home registrations) are also retried
//! when a timeout or lost connection leaves their outcome unknown; the home
//! registration and Revoke are not (a repeat would answer "exists" / "not
//! found" for work the first attempt may have done), and fail with etcd's
//! "request timed out" instead.

use std::collections::{BTreeSet, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use futures::future::{join_all, ready, try_join_all};
use futures::{Stream, StreamExt};
use metastore_proto::etcdserverpb as pb;
use metastore_proto::router::lease_key;
use metastore_proto::shardpb::{
    self as spb, shard_request::Body as Req, shard_response::Body as Resp,
};
use rand::Rng;
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;
use crate::error::{GatewayError, Result};
use crate::etcdserverpb::lease_server::Lease;
use crate::shards::Transport;

/// etcd's `MaxLeaseTTL` (seconds).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;
/// etcd's minimum lease TTL with its default election timeout (1 s) and
/// heartbeat (100 ms): ceil(1.5 × election timeout) = 2 s.
pub const MIN_LEASE_TTL: i64 = 2;
/// Renewals of one keep-alive stream in flight at once.
pub const KEEPALIVE_PIPELINE: usize = 64;
/// How many random IDs a grant tries before giving up.
const ID_ATTEMPTS: usize = 16;

// ---------------------------------------------------------------------------
// Typed shard calls
// ---------------------------------------------------------------------------

macro_rules! lease_call {
    ($name:ident, $req:ty, $variant:ident, $resp:ty) => {
        async fn $name(t: &dyn Transport, shard: u32, req: $req) -> Result<$resp> {
            match t.call(shard, Req::$variant(req)).await? {
                Resp::$variant(r) => Ok(r),
                _ => Err(GatewayError::Protocol(format!(
                    "expected a {} response from shard {shard}",
                    stringify!($name)
                ))),
            }
        }
    };
}

lease_call!(
    register,
    spb::LeaseRegisterRequest,
    LeaseRegister,
    spb::LeaseRegisterResponse
);
lease_call!(
    revoke,
    spb::LeaseRevokeRequest,
    LeaseRevoke,
    spb::LeaseRevokeResponse
);
lease_call!(
    keep_alive,
    spb::LeaseKeepAliveRequest,
    LeaseKeepAlive,
    spb::LeaseKeepAliveResponse
);
lease_call!(
    time_to_live,
    spb::LeaseTimeToLiveRequest,
    LeaseTimeToLive,
    spb::LeaseTimeToLiveResponse
);
lease_call!(
    keys,
    spb::LeaseKeysRequest,
    LeaseKeys,
    spb::LeaseKeysResponse
);
lease_call!(
    list,
    spb::LeaseListRequest,
    LeaseList,
    spb::LeaseListResponse
);

/// etcd's TTL rules for a grant: too large is refused, too small raised.
pub fn grant_ttl(ttl: i64) -> Result<i64> {
    if ttl > MAX_LEASE_TTL {
        Err(GatewayError::LeaseTtlTooLarge)
    } else {
        Ok(ttl.max(MIN_LEASE_TTL))
    }
}

/// A random positive lease ID.
fn random_id() -> i64 {
    rand::thread_rng().gen_range(1..=i64::MAX)
}

impl Backend {
    /// The shard that is the lease's authority.
    pub fn lease_home(&self, id: i64) -> u32 {
        self.router.shard_of(&lease_key(id))
    }

    /// etcd's LeaseGrant (see the module docs).
    pub async fn lease_grant(&self, req: pb::LeaseGrantRequest) -> Result<pb::LeaseGrantResponse> {
        let ttl = grant_ttl(req.ttl)?;
        let mut attempts = 0;
        // Tells this grant's registrations from a late one of an earlier
        // grant of the same id (see shard.proto, LeaseRegisterRequest).
        let grant: u64 = rand::random::<u64>() | 1;
        let (id, home) = loop {
            attempts += 1;
            let id = if req.id == 0 { random_id() } else { req.id };
            let home = self.lease_home(id);
            let r = spb::LeaseRegisterRequest {
                id,
                ttl,
                home: true,
                grant,
            };
            match self.retry(|| register(self.t(), home, r)).await {
                Ok(_) => break (id, home),
                Err(GatewayError::LeaseExists) if req.id == 0 && attempts < ID_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        };
        let others = self.all_shards().into_iter().filter(|&s| s != home);
        // join_all, not try_join_all: every registration must have finished
        // (succeeded or failed) before a compensating revoke, or one still in
        // flight could land after it and leave a stray record.
        let registered = join_all(others.map(|s| {
            let r = spb::LeaseRegisterRequest {
                id,
                ttl,
                home: false,
                grant,
            };
            self.retry_idempotent(move || register(self.t(), s, r))
        }))
        .await;
        if let Some(Err(e)) = registered.into_iter().find(|r| r.is_err()) {
            tracing::warn!(lease = id, error = %e, "lease registration failed; revoking it");
            let r = spb::LeaseRevokeRequest { id };
            if let Err(e2) = self.retry(|| revoke(self.t(), home, r)).await {
                tracing::warn!(lease = id, error = %e2, "revoking a half-registered lease failed");
            }
            return Err(e);
        }
        Ok(pb::LeaseGrantResponse {
            header: Some(self.best_effort_header().await),
            id,
            ttl,
            error: String::new(),
        })
    }

    /// etcd's LeaseRevoke: the home shard deletes every attached key, on
    /// every shard, at one revision, reported in the header.
    pub async fn lease_revoke(
        &self,
        req: pb::LeaseRevokeRequest,
    ) -> Result<pb::LeaseRevokeResponse> {
        let home = self.lease_home(req.id);
        let r = spb::LeaseRevokeRequest { id: req.id };
        let resp = self.retry(|| revoke(self.t(), home, r)).await?;
        let mut header = self.best_effort_header().await;
        header.revision = resp.revision;
        Ok(pb::LeaseRevokeResponse {
            header: Some(header),
        })
    }

    /// One keep-alive: renews the lease at home. TTL 0: no such lease. The
    /// header is the home shard's revision just before it renewed.
    pub async fn lease_keep_alive(&self, id: i64) -> Result<pb::LeaseKeepAliveResponse> {
        let home = self.lease_home(id);
        let r = spb::LeaseKeepAliveRequest { id };
        let renewed = self
            .retry_idempotent(|| keep_alive(self.t(), home, r))
            .await?;
        Ok(pb::LeaseKeepAliveResponse {
            header: Some(self.header(renewed.revision, renewed.raft_term)),
            id,
            ttl: renewed.ttl,
        })
    }

    /// etcd's LeaseTimeToLive (TTL -1 for an unknown lease).
    pub async fn lease_time_to_live(
        &self,
        req: pb::LeaseTimeToLiveRequest,
    ) -> Result<pb::LeaseTimeToLiveResponse> {
        let id = req.id;
        let home = self.lease_home(id);
        let r = spb::LeaseTimeToLiveRequest { id };
        let t = self
            .retry_idempotent(|| time_to_live(self.t(), home, r))
            .await?;
        if !t.found {
            return Ok(pb::LeaseTimeToLiveResponse {
                header: Some(self.best_effort_header().await),
                id,
                ttl: -1,
                granted_ttl: 0,
                keys: vec![],
            });
        }
        let keys = if req.keys {
            let parts = try_join_all(self.all_shards().into_iter().map(|s| {
                let r = spb::LeaseKeysRequest { id };
                self.retry_idempotent(move || keys(self.t(), s, r))
            }))
            .await?;
            merge_keys(parts)
        } else {
            vec![]
        };
        Ok(pb::LeaseTimeToLiveResponse {
            header: Some(self.best_effort_header().await),
            id,
            ttl: t.ttl,
            granted_ttl: t.granted_ttl,
            keys,
        })
    }

    /// etcd's LeaseLeases: every shard's home leases, sorted by ID.
    pub async fn lease_leases(&self) -> Result<pb::LeaseLeasesResponse> {
        let parts =
            try_join_all(self.all_shards().into_iter().map(|s| {
                self.retry_idempotent(move || list(self.t(), s, spb::LeaseListRequest {}))
            }))
            .await?;
        Ok(pb::LeaseLeasesResponse {
            header: Some(self.best_effort_header().await),
            leases: merge_leases(parts),
        })
    }
}

/// The union of the shards' attached keys, sorted, without duplicates.
pub fn merge_keys(parts: Vec<spb::LeaseKeysResponse>) -> Vec<Vec<u8>> {
    let all: BTreeSet<Vec<u8>> = parts.into_iter().flat_map(|p| p.keys).collect();
    all.into_iter().collect()
}

/// The union of the shards' lease lists, soonest to expire first (etcd
/// sorts its leases by remaining time), ties by ID. A lease is listed by
/// its home shard only; were one listed twice, it is kept once.
pub fn merge_leases(parts: Vec<spb::LeaseListResponse>) -> Vec<pb::LeaseStatus> {
    let mut all: Vec<(u64, i64)> = parts
        .into_iter()
        .flat_map(|p| {
            let left = p
                .remaining_micros
                .into_iter()
                .chain(std::iter::repeat(u64::MAX));
            left.zip(p.ids)
        })
        .collect();
    all.sort_unstable();
    let mut seen = HashSet::with_capacity(all.len());
    all.into_iter()
        .filter(|&(_, id)| seen.insert(id))
        .map(|(_, id)| pb::LeaseStatus { id })
        .collect()
}

// ---------------------------------------------------------------------------
// The tonic service
// ---------------------------------------------------------------------------

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// etcd's Lease service.
#[derive(Clone)]
pub struct LeaseService {
    backend: Arc<Backend>,
}

impl LeaseService {
    pub fn new(backend: Arc<Backend>) -> Self {
        LeaseService { backend }
    }
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        Ok(Response::new(
            self.backend.lease_grant(request.into_inner()).await?,
        ))
    }

    async fn lease_revoke(
        &self,
        request: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        Ok(Response::new(
            self.backend.lease_revoke(request.into_inner()).await?,
        ))
    }

    type LeaseKeepAliveStream = BoxStream<pb::LeaseKeepAliveResponse>;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let backend = self.backend.clone();
        let responses = request
            .into_inner()
            .map(move |req| {
                let backend = backend.clone();
                async move {
                    let req = req.map_err(crate::grpc::inbound_status)?;
                    Ok(backend.lease_keep_alive(req.id).await?)
                }
            })
            .buffered(KEEPALIVE_PIPELINE)
            // The first error ends the stream (after it is sent).
            .scan(false, |failed, item: Result<_, Status>| {
                if *failed {
                    return ready(None);
                }
                *failed = item.is_err();
                ready(Some(item))
            });
        Ok(Response::new(Box::pin(responses)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        Ok(Response::new(
            self.backend
                .lease_time_to_live(request.into_inner())
                .await?,
        ))
    }

    async fn lease_leases(
        &self,
        _request: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        Ok(Response::new(self.backend.lease_leases().await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backend, FakeShards, MEMBER};
    use metastore_proto::shardpb::{shard_error::Code, CurrentRevisionResponse, ShardError};
    use std::collections::hash_map::Entry;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use tonic::Code as GrpcCode;

    fn current(rev: i64) -> Result<Resp> {
        Ok(Resp::CurrentRevision(CurrentRevisionResponse {
            revision: rev,
            raft_term: 3,
            ..Default::default()
        }))
    }

    fn shard_error(code: Code, msg: &str) -> GatewayError {
        GatewayError::from_shard(ShardError {
            code: code as i32,
            message: msg.into(),
        })
    }

    #[test]
    fn lease_errors_map_to_etcd_statuses() {
        let s = shard_error(Code::LeaseNotFound, "x").to_status();
        assert_eq!(s.code(), GrpcCode::NotFound);
        assert_eq!(s.message(), "etcdserver: requested lease not found");
        let s = shard_error(Code::LeaseExists, "x").to_status();
        assert_eq!(s.code(), GrpcCode::FailedPrecondition);
        assert_eq!(s.message(), "etcdserver: lease already exists");
        let s = GatewayError::LeaseTtlTooLarge.to_status();
        assert_eq!(s.code(), GrpcCode::OutOfRange);
        assert_eq!(s.message(), "etcdserver: too large lease TTL");
        assert!(!shard_error(Code::LeaseNotFound, "").is_retryable());
        assert!(!shard_error(Code::LeaseExists, "").is_retryable());
    }

    #[test]
    fn ttl_rules_match_etcd() {
        assert_eq!(grant_ttl(1), Ok(2));
        assert_eq!(grant_ttl(0), Ok(2));
        assert_eq!(grant_ttl(-5), Ok(2));
        assert_eq!(grant_ttl(2), Ok(2));
        assert_eq!(grant_ttl(60), Ok(60));
        assert_eq!(grant_ttl(MAX_LEASE_TTL), Ok(MAX_LEASE_TTL));
        assert_eq!(
            grant_ttl(MAX_LEASE_TTL + 1),
            Err(GatewayError::LeaseTtlTooLarge)
        );
    }

    type Records = Arc<Mutex<HashMap<(u32, i64), bool>>>;

    /// A shard handler keeping lease records like the real shards do.
    fn lease_handler(records: Records) -> impl Fn(u32, Req) -> Result<Resp> + Send + Sync {
        move |shard, req| match req {
            Req::CurrentRevision(_) => current(77),
            Req::LeaseRegister(reg) => {
                let mut records = records.lock().unwrap();
                match records.entry((shard, reg.id)) {
                    Entry::Occupied(_) if reg.home => {
                        return Err(shard_error(Code::LeaseExists, "exists"));
                    }
                    Entry::Occupied(_) => {}
                    Entry::Vacant(v) => {
                        v.insert(reg.home);
                    }
                }
                Ok(Resp::LeaseRegister(spb::LeaseRegisterResponse {
                    ttl: reg.ttl,
                }))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn registrations(fake: &FakeShards) -> Vec<(u32, spb::LeaseRegisterRequest)> {
        fake.calls()
            .into_iter()
            .filter_map(|(s, r)| match r {
                Req::LeaseRegister(r) => Some((s, r)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn grant_registers_at_home_first_then_everywhere() {
        let records = Records::default();
        let fake = FakeShards::new(3, lease_handler(records.clone()));
        let b = backend(fake.clone());
        let id = 0x1234;
        let resp = b
            .lease_grant(pb::LeaseGrantRequest { ttl: 1, id })
            .await
            .unwrap();
        assert_eq!((resp.id, resp.ttl), (id, 2), "TTL raised to the minimum");
        let h = resp.header.unwrap();
        assert_eq!((h.revision, h.raft_term, h.member_id), (77, 3, MEMBER));
        let regs = registrations(&fake);
        assert_eq!(regs.len(), 3);
        let home = b.lease_home(id);
        assert_eq!(regs[0].0, home, "home shard first");
        assert!(regs[0].1.home);
        assert!(regs[1..]
            .iter()
            .all(|(s, r)| *s != home && !r.home && r.ttl == 2));
        assert_eq!(records.lock().unwrap().len(), 3);

        // The same ID again: refused at home, nothing else registered.
        let e = b
            .lease_grant(pb::LeaseGrantRequest { ttl: 10, id })
            .await
            .unwrap_err();
        assert_eq!(e.to_status().code(), GrpcCode::FailedPrecondition);
        assert_eq!(registrations(&fake).len(), 4);

        let e = b
            .lease_grant(pb::LeaseGrantRequest {
                ttl: MAX_LEASE_TTL + 1,
                id: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(e, GatewayError::LeaseTtlTooLarge);
        assert_eq!(registrations(&fake).len(), 4);
    }

    #[tokio::test]
    async fn grant_without_id_picks_a_positive_one_and_retries_taken_ones() {
        let inner = lease_handler(Records::default());
        // The first two home registrations find their ID taken.
        let taken = Mutex::new(2);
        let fake = FakeShards::new(2, move |shard, req| {
            if let Req::LeaseRegister(r) = &req {
                let mut t = taken.lock().unwrap();
                if r.home && *t > 0 {
                    *t -= 1;
                    return Err(shard_error(Code::LeaseExists, "exists"));
                }
            }
            inner(shard, req)
        });
        let b = backend(fake.clone());
        let resp = b
            .lease_grant(pb::LeaseGrantRequest { ttl: 30, id: 0 })
            .await
            .unwrap();
        assert!(resp.id > 0);
        assert_eq!(resp.ttl, 30);
        let homes: Vec<i64> = registrations(&fake)
            .into_iter()
            .filter(|(_, r)| r.home)
            .map(|(_, r)| r.id)
            .collect();
        assert_eq!(homes.len(), 3);
        assert_eq!(*homes.last().unwrap(), resp.id);
    }

    #[tokio::test]
    async fn grant_retries_unavailable_shards_and_undoes_a_failed_one() {
        let records = Records::default();
        let inner = lease_handler(records.clone());
        let id = 99;
        let home = backend(FakeShards::new(2, |_, _| unreachable!())).lease_home(id);
        // Home succeeds, then the other shard is briefly unavailable.
        let flaky = Mutex::new(3);
        let fake = FakeShards::new(2, move |shard, req| {
            if shard != home && matches!(req, Req::LeaseRegister(_)) {
                let mut n = flaky.lock().unwrap();
                if *n > 0 {
                    *n -= 1;
                    return Err(GatewayError::ShardUnavailable("starting".into()));
                }
            }
            inner(shard, req)
        });
        let b = backend(fake);
        b.lease_grant(pb::LeaseGrantRequest { ttl: 5, id })
            .await
            .unwrap();
        assert_eq!(records.lock().unwrap().len(), 2);

        // The other shard refuses for good: the lease is revoked at home.
        let inner = lease_handler(Records::default());
        let fake = FakeShards::new(2, move |shard, req| match req {
            Req::LeaseRegister(r) if !r.home => Err(GatewayError::Internal("disk".into())),
            Req::LeaseRevoke(r) => {
                assert_eq!((shard, r.id), (home, id));
                Ok(Resp::LeaseRevoke(spb::LeaseRevokeResponse { revision: 3 }))
            }
            req => inner(shard, req),
        });
        let b = backend(fake.clone());
        let e = b
            .lease_grant(pb::LeaseGrantRequest { ttl: 5, id })
            .await
            .unwrap_err();
        assert_eq!(e, GatewayError::Internal("disk".into()));
        assert!(fake
            .calls()
            .iter()
            .any(|(_, r)| matches!(r, Req::LeaseRevoke(_))));
    }

    #[tokio::test]
    async fn time_to_live_unknown_is_minus_one_and_keys_are_merged() {
        let fake = FakeShards::new(2, |shard, req| match req {
            Req::CurrentRevision(_) => current(5),
            Req::LeaseTimeToLive(t) if t.id == 7 => {
                Ok(Resp::LeaseTimeToLive(spb::LeaseTimeToLiveResponse {
                    found: true,
                    ttl: 8,
                    granted_ttl: 10,
                }))
            }
            Req::LeaseTimeToLive(_) => Ok(Resp::LeaseTimeToLive(Default::default())),
            Req::LeaseKeys(_) => Ok(Resp::LeaseKeys(spb::LeaseKeysResponse {
                keys: if shard == 0 {
                    vec![b"c".to_vec(), b"a".to_vec()]
                } else {
                    vec![b"b".to_vec()]
                },
            })),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let r = b
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 8, keys: true })
            .await
            .unwrap();
        assert_eq!((r.id, r.ttl, r.granted_ttl), (8, -1, 0));
        assert!(r.keys.is_empty());
        assert_eq!(r.header.unwrap().revision, 5);
        let r = b
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 7, keys: false })
            .await
            .unwrap();
        assert_eq!((r.ttl, r.granted_ttl), (8, 10));
        assert!(r.keys.is_empty());
        let r = b
            .lease_time_to_live(pb::LeaseTimeToLiveRequest { id: 7, keys: true })
            .await
            .unwrap();
        assert_eq!(r.keys, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    }

    #[tokio::test]
    async fn leases_are_the_union_of_every_shard() {
        let fake = FakeShards::new(3, |shard, req| match req {
            Req::CurrentRevision(_) => current(5),
            Req::LeaseList(_) => Ok(Resp::LeaseList(spb::LeaseListResponse {
                ids: vec![10 - shard as i64, 20 + shard as i64],
                remaining_micros: vec![5, 5],
            })),
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake);
        let r = b.lease_leases().await.unwrap();
        let ids: Vec<i64> = r.leases.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![8, 9, 10, 20, 21, 22]);
    }

    #[test]
    fn leases_are_listed_soonest_to_expire_first() {
        let part = |ids: Vec<i64>, remaining_micros: Vec<u64>| spb::LeaseListResponse {
            ids,
            remaining_micros,
        };
        let merged = merge_leases(vec![
            part(vec![1, 4], vec![90_000_000, 5_000_000]),
            part(vec![2, 3, 4], vec![30_000_000, 5_000_000, 5_000_000]),
            // A server that sends no remaining times: as leases without a
            // deadline, last (etcd's `Remaining` of those is the largest).
            part(vec![7, 6], vec![]),
        ]);
        let ids: Vec<i64> = merged.iter().map(|l| l.id).collect();
        assert_eq!(ids, vec![3, 4, 2, 1, 6, 7]);
    }

    #[tokio::test]
    async fn revoke_reports_its_revision_and_unknown_is_not_found() {
        let fake = FakeShards::new(2, |_, req| match req {
            Req::CurrentRevision(_) => current(50),
            Req::LeaseRevoke(r) if r.id == 1 => {
                Ok(Resp::LeaseRevoke(spb::LeaseRevokeResponse { revision: 42 }))
            }
            Req::LeaseRevoke(_) => Err(shard_error(Code::LeaseNotFound, "nf")),
            other => panic!("unexpected {other:?}"),
        });
        // A revocation under way elsewhere: retried.
        fake.fail_next(2, GatewayError::Conflict("revoking".into()));
        let b = backend(fake);
        let r = b
            .lease_revoke(pb::LeaseRevokeRequest { id: 1 })
            .await
            .unwrap();
        let h = r.header.unwrap();
        assert_eq!((h.revision, h.raft_term), (42, 3));
        let e = b
            .lease_revoke(pb::LeaseRevokeRequest { id: 2 })
            .await
            .unwrap_err();
        assert_eq!(e.to_status().code(), GrpcCode::NotFound);
    }

    #[tokio::test]
    async fn keep_alive_goes_home_and_reports_ttl() {
        // The first renewal times out: renewals are idempotent, so retried.
        let timeouts = Mutex::new(1);
        // The header is the home's revision at the renewal: no separate
        // read of the current revision (one after the renewal could show
        // a revision past a revoke of the lease).
        let fake = FakeShards::new(2, move |shard, req| match req {
            Req::LeaseKeepAlive(k) => {
                let mut t = timeouts.lock().unwrap();
                if *t > 0 {
                    *t -= 1;
                    return Err(GatewayError::Timeout { shard });
                }
                Ok(Resp::LeaseKeepAlive(spb::LeaseKeepAliveResponse {
                    ttl: if k.id == 3 { 10 } else { 0 },
                    revision: 9,
                    raft_term: 2,
                }))
            }
            other => panic!("unexpected {other:?}"),
        });
        let b = backend(fake.clone());
        let r = b.lease_keep_alive(3).await.unwrap();
        let h = r.header.unwrap();
        assert_eq!((r.id, r.ttl, h.revision, h.raft_term), (3, 10, 9, 2));
        let r = b.lease_keep_alive(4).await.unwrap();
        assert_eq!((r.id, r.ttl), (4, 0));
        let homes: Vec<u32> = fake
            .calls()
            .into_iter()
            .filter_map(|(s, r)| match r {
                Req::LeaseKeepAlive(k) => Some((s, k.id)),
                _ => None,
            })
            .map(|(s, id)| {
                assert_eq!(s, b.lease_home(id));
                s
            })
            .collect();
        assert_eq!(homes.len(), 3, "one retried renewal, then two");
    }
}
