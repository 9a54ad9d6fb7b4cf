//! The tonic services: etcd's KV, Maintenance, Cluster, Watch, Lease and
//! Auth, each a thin shell over [`Backend`].
//!
//! This is the edge: requests are size-checked here (etcd's
//! `--max-request-bytes`), and [`GatewayError`] becomes a `tonic::Status`
//! here and nowhere else (via `?` and `From<GatewayError> for Status`).
//!
//! - **KV**: all of it; see [`crate::kv`] and [`crate::coordinator`].
//! - **Maintenance**: `status` aggregates the shards' status (below);
//!   `alarm` has nothing to report (no alarms are raised yet: GET answers
//!   an empty list, ACTIVATE/DEACTIVATE succeed with an empty list); the
//!   rest is `Unimplemented`.
//! - **Cluster**: `member_list` answers this member, advertising the
//!   gateway's client URL (the URL that really serves the API).
//! - **Watch**: [`WatchService`] hands each stream to a session of
//!   [`crate::watch`]; watch failures are answered inside the stream as
//!   etcd does (`canceled` responses with a reason), never as a `Status`.
//! - **Lease**: served by [`crate::lease`].
//! - **Auth**: registered so clients get a clean `Unimplemented` instead
//!   of a transport error (MetaStore has no authentication yet).
//!
//! # Status aggregation ([`merge_status`])
//!
//! One gateway fronts several raft groups (one per shard), while etcd's
//! `StatusResponse` describes one. We report: `version` = an etcd 3.5
//! version ([`ETCD_VERSION`]) so version-gated clients enable their
//! features; `db_size`, `db_size_in_use` = the sum over shards;
//! `raft_index` and `raft_applied_index` = the **sum** over shards (it
//! moves whenever any shard commits, and never goes backwards, which is
//! what clients comparing indexes across calls rely on); `raft_term` = the
//! maximum; `leader` = this member; header revision = the newest revision
//! any shard reports.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Poll};

use futures::future::try_join_all;
use futures::{Stream, StreamExt};
use metastore_proto::etcdserverpb::{self as pb, *};
use metastore_proto::shardpb::{self as spb};
use tonic::{Request, Response, Status, Streaming};

use crate::backend::Backend;
use crate::error::GatewayError;
use crate::etcdserverpb::{
    auth_server::Auth, cluster_server::Cluster, kv_server::Kv, maintenance_server::Maintenance,
    watch_server::Watch,
};
use crate::grpc::inbound_status;
use crate::kv::check_size;
use crate::shards;
use crate::watch::wire::OutgoingWatchResponse;
use crate::watch::WatchHub;

/// The etcd server version the gateway reports.
pub const ETCD_VERSION: &str = "3.5.17";

/// Peer URL reported for this member (there is no etcd peer protocol).
pub const PEER_URL: &str = "http://127.0.0.1:2380";

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn unimplemented(what: &str) -> Status {
    GatewayError::Unimplemented(format!("{what} is not implemented yet")).into()
}

/// etcd's KV service.
#[derive(Clone)]
pub struct KvService {
    backend: Arc<Backend>,
    max_request_bytes: usize,
}

impl KvService {
    pub fn new(backend: Arc<Backend>, max_request_bytes: usize) -> Self {
        KvService {
            backend,
            max_request_bytes,
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let req = request.into_inner();
        check_size(&req, self.max_request_bytes)?;
        Ok(Response::new(self.backend.range(req).await?))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        check_size(&req, self.max_request_bytes)?;
        Ok(Response::new(self.backend.put(req).await?))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        check_size(&req, self.max_request_bytes)?;
        Ok(Response::new(self.backend.delete_range(req).await?))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = request.into_inner();
        check_size(&req, self.max_request_bytes)?;
        Ok(Response::new(self.backend.txn(req).await?))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        Ok(Response::new(
            self.backend.compact(request.into_inner()).await?,
        ))
    }
}

/// Aggregates the shards' status into etcd's (rules in the module docs).
pub fn merge_status(backend: &Backend, parts: &[spb::StatusResponse]) -> pb::StatusResponse {
    let db_size = parts.iter().map(|p| p.db_size).sum();
    let raft_index = parts.iter().map(|p| p.raft_index).sum();
    let raft_applied_index = parts.iter().map(|p| p.raft_applied_index).sum();
    let raft_term = parts.iter().map(|p| p.raft_term).max().unwrap_or(0);
    let revision = parts.iter().map(|p| p.revision).max().unwrap_or(0);
    pb::StatusResponse {
        header: Some(backend.header(revision, raft_term)),
        version: ETCD_VERSION.to_string(),
        db_size,
        leader: backend.identity.member_id,
        raft_index,
        raft_term,
        raft_applied_index,
        errors: vec![],
        db_size_in_use: db_size,
        is_learner: false,
    }
}

/// etcd's Maintenance service.
#[derive(Clone)]
pub struct MaintenanceService {
    backend: Arc<Backend>,
}

impl MaintenanceService {
    pub fn new(backend: Arc<Backend>) -> Self {
        MaintenanceService { backend }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        _request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        Ok(Response::new(AlarmResponse {
            header: Some(self.backend.best_effort_header().await),
            alarms: vec![],
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let b = &self.backend;
        let (parts, current) = futures::try_join!(
            try_join_all(
                b.all_shards()
                    .into_iter()
                    .map(|s| b.retry(move || shards::status(b.t(), s, spb::StatusRequest {}))),
            ),
            b.current_revision(),
        )?;
        let mut resp = merge_status(b, &parts);
        // The oracle's revision covers writes on every shard, even one
        // whose own status lags.
        if let Some(h) = resp.header.as_mut() {
            h.revision = h.revision.max(current.0);
        }
        Ok(Response::new(resp))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Err(unimplemented("defragment"))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        Err(unimplemented("hash"))
    }

    async fn hash_kv(
        &self,
        _request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        Err(unimplemented("hash_kv"))
    }

    type SnapshotStream = BoxStream<SnapshotResponse>;

    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented("snapshot"))
    }

    async fn move_leader(
        &self,
        _request: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        Err(unimplemented("move_leader"))
    }

    async fn downgrade(
        &self,
        _request: Request<DowngradeRequest>,
    ) -> Result<Response<DowngradeResponse>, Status> {
        Err(unimplemented("downgrade"))
    }
}

/// etcd's Cluster service.
#[derive(Clone)]
pub struct ClusterService {
    backend: Arc<Backend>,
    client_url: String,
}

impl ClusterService {
    pub fn new(backend: Arc<Backend>, client_url: String) -> Self {
        ClusterService {
            backend,
            client_url,
        }
    }

    /// This member, as etcd's Member.
    pub fn member(&self) -> Member {
        Member {
            id: self.backend.identity.member_id,
            name: self.backend.identity.member_name.clone(),
            peer_ur_ls: vec![PEER_URL.to_string()],
            client_ur_ls: vec![self.client_url.clone()],
            is_learner: false,
        }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_add(
        &self,
        _request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        Err(unimplemented("member_add"))
    }

    async fn member_remove(
        &self,
        _request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        Err(unimplemented("member_remove"))
    }

    async fn member_update(
        &self,
        _request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(unimplemented("member_update"))
    }

    async fn member_list(
        &self,
        _request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let mut header = self.backend.best_effort_header().await;
        // etcd's cluster header carries no revision.
        header.revision = 0;
        Ok(Response::new(MemberListResponse {
            header: Some(header),
            members: vec![self.member()],
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        Err(unimplemented("member_promote"))
    }
}

/// etcd's Watch service.
#[derive(Clone)]
pub struct WatchService {
    hub: Arc<WatchHub>,
}

impl WatchService {
    pub fn new(hub: Arc<WatchHub>) -> Self {
        WatchService { hub }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = BoxStream<OutgoingWatchResponse>;

    async fn watch(
        &self,
        request: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut responses = self.hub.open(request.into_inner());
        // After the last response, the request stream's error, if that is
        // what ended it: etcd returns it as the call's status.
        let stream = futures::stream::poll_fn(move |cx| {
            Poll::Ready(match ready!(responses.poll_next_unpin(cx)) {
                Some(r) => Some(Ok(r)),
                None => responses.take_broken().map(|e| Err(inbound_status(e))),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Placeholder Auth service (answers `Unimplemented`).
#[derive(Clone, Default)]
pub struct UnimplementedAuth;

macro_rules! unimplemented_auth {
    ($($name:ident($req:ident) -> $resp:ident;)*) => {
        #[tonic::async_trait]
        impl Auth for UnimplementedAuth {
            $(
                async fn $name(&self, _request: Request<$req>) -> Result<Response<$resp>, Status> {
                    Err(unimplemented("auth"))
                }
            )*
        }
    };
}

unimplemented_auth! {
    auth_enable(AuthEnableRequest) -> AuthEnableResponse;
    auth_disable(AuthDisableRequest) -> AuthDisableResponse;
    auth_status(AuthStatusRequest) -> AuthStatusResponse;
    authenticate(AuthenticateRequest) -> AuthenticateResponse;
    user_add(AuthUserAddRequest) -> AuthUserAddResponse;
    user_get(AuthUserGetRequest) -> AuthUserGetResponse;
    user_list(AuthUserListRequest) -> AuthUserListResponse;
    user_delete(AuthUserDeleteRequest) -> AuthUserDeleteResponse;
    user_change_password(AuthUserChangePasswordRequest) -> AuthUserChangePasswordResponse;
    user_grant_role(AuthUserGrantRoleRequest) -> AuthUserGrantRoleResponse;
    user_revoke_role(AuthUserRevokeRoleRequest) -> AuthUserRevokeRoleResponse;
    role_add(AuthRoleAddRequest) -> AuthRoleAddResponse;
    role_get(AuthRoleGetRequest) -> AuthRoleGetResponse;
    role_list(AuthRoleListRequest) -> AuthRoleListResponse;
    role_delete(AuthRoleDeleteRequest) -> AuthRoleDeleteResponse;
    role_grant_permission(AuthRoleGrantPermissionRequest) -> AuthRoleGrantPermissionResponse;
    role_revoke_permission(AuthRoleRevokePermissionRequest) -> AuthRoleRevokePermissionResponse;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{backend, FakeShards, MEMBER};

    #[test]
    fn status_sums_sizes_and_indexes() {
        let b = backend(FakeShards::new(2, |_, _| unreachable!()));
        let parts = vec![
            spb::StatusResponse {
                raft_index: 10,
                raft_term: 2,
                raft_applied_index: 9,
                db_size: 100,
                leader: 1,
                revision: 50,
                compact_revision: 0,
            },
            spb::StatusResponse {
                raft_index: 5,
                raft_term: 3,
                raft_applied_index: 5,
                db_size: 20,
                leader: 1,
                revision: 52,
                compact_revision: 0,
            },
        ];
        let s = merge_status(&b, &parts);
        assert_eq!(s.version, ETCD_VERSION);
        assert_eq!(s.db_size, 120);
        assert_eq!(s.raft_index, 15);
        assert_eq!(s.raft_applied_index, 14);
        assert_eq!(s.raft_term, 3);
        assert_eq!(s.leader, MEMBER);
        let h = s.header.unwrap();
        assert_eq!((h.revision, h.member_id), (52, MEMBER));
    }

    #[tokio::test]
    async fn member_list_advertises_the_gateway() {
        let b = Arc::new(backend(FakeShards::new(1, |_, _| {
            Err(GatewayError::ShardUnavailable("down".into()))
        })));
        let mut b2 = Arc::try_unwrap(b).ok().unwrap();
        b2.retry.budget = std::time::Duration::from_millis(10);
        let c = ClusterService::new(Arc::new(b2), "http://127.0.0.1:2379".into());
        let resp = c
            .member_list(Request::new(MemberListRequest {
                linearizable: false,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.members.len(), 1);
        let m = &resp.members[0];
        assert_eq!(m.id, MEMBER);
        assert_eq!(m.client_ur_ls, vec!["http://127.0.0.1:2379"]);
        assert_eq!(m.peer_ur_ls, vec![PEER_URL]);
    }

    #[tokio::test]
    async fn oversized_requests_are_refused_at_the_edge() {
        let b = Arc::new(backend(FakeShards::new(1, |_, _| unreachable!())));
        let kv = KvService::new(b, 100);
        let e = kv
            .put(Request::new(PutRequest {
                key: b"k".to_vec().into(),
                value: vec![0; 200].into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "etcdserver: request is too large");
        let e = UnimplementedAuth
            .auth_status(Request::new(AuthStatusRequest {}))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }
}
