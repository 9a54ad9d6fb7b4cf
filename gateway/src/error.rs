//! The gateway's one error type, and the one place it becomes a gRPC status.
//!
//! Everything below the tonic services (the shard client, the merge
//! functions, the transaction coordinator) speaks [`GatewayError`]: a typed
//! enum that keeps the difference between "the shard refused" and "we could
//! not reach the shard", and between retryable and final failures. Only the
//! service edge calls [`GatewayError::to_status`] (or the `From` impl), which
//! maps each variant to the gRPC code and message etcd v3.5 uses for the
//! same situation, so clients react to MetaStore exactly as they do to etcd
//! (`clientv3` retries `Unavailable`, surfaces `OutOfRange` as
//! `ErrCompacted`, matches messages such as "etcdserver: key not found").
//!
//! Invariants:
//! - a shard's `ShardError` becomes exactly one variant ([`GatewayError::from_shard`]);
//! - `Conflict` and `TxnAborted` are internal: the coordinator retries them
//!   and, when retries run out, wraps the last one in `RetriesExhausted`,
//!   which clients see as etcd's "request timed out";
//! - anything that means "the outcome may be unknown" (timeouts, lost
//!   connections) is `Unavailable` "etcdserver: request timed out", as etcd
//!   answers when a proposal times out.

use metastore_proto::shardpb::{shard_error::Code, ShardError};
use metastore_proto::txn::TxnCheckError;
use tonic::{Code as GrpcCode, Status};

/// etcd's message for a compacted revision.
pub const MSG_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
/// etcd's message for a revision in the future.
pub const MSG_FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
/// etcd's message for a timed-out request (outcome unknown).
pub const MSG_TIMEOUT: &str = "etcdserver: request timed out";
pub const MSG_EMPTY_KEY: &str = "etcdserver: key is not provided";
pub const MSG_TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
pub const MSG_DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
pub const MSG_VALUE_PROVIDED: &str = "etcdserver: value is provided";
pub const MSG_LEASE_PROVIDED: &str = "etcdserver: lease is provided";
pub const MSG_TOO_LARGE: &str = "etcdserver: request is too large";
pub const MSG_INVALID_SORT: &str = "etcdserver: invalid sort option";
pub const MSG_LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";
pub const MSG_LEASE_EXISTS: &str = "etcdserver: lease already exists";
pub const MSG_LEASE_TTL_TOO_LARGE: &str = "etcdserver: too large lease TTL";
/// etcd's answer to a txn op that names no request (`ErrGRPCKeyNotFound`).
pub const MSG_KEY_NOT_FOUND: &str = "etcdserver: key not found";

/// Everything that can go wrong between a gRPC request and its response.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GatewayError {
    // ---- refused by the gateway before reaching a shard ----
    #[error("{}", MSG_EMPTY_KEY)]
    KeyNotProvided,
    #[error("{}", MSG_TOO_MANY_OPS)]
    TooManyOps,
    #[error("{}", MSG_DUPLICATE_KEY)]
    DuplicateKey,
    #[error("{}", MSG_VALUE_PROVIDED)]
    ValueProvided,
    #[error("{}", MSG_LEASE_PROVIDED)]
    LeaseProvided,
    #[error("{}", MSG_TOO_LARGE)]
    RequestTooLarge,
    #[error("{}", MSG_INVALID_SORT)]
    InvalidSortOption,
    /// A lease TTL above etcd's `MaxLeaseTTL`.
    #[error("{}", MSG_LEASE_TTL_TOO_LARGE)]
    LeaseTtlTooLarge,

    // ---- answered by a shard (ShardError) ----
    #[error("{}", MSG_COMPACTED)]
    Compacted,
    #[error("{}", MSG_FUTURE_REV)]
    FutureRevision,
    /// etcd's ErrLeaseNotFound (a grant, revoke or put naming an unknown lease).
    #[error("{}", MSG_LEASE_NOT_FOUND)]
    LeaseNotFound,
    /// etcd's ErrLeaseExist (a grant with an ID in use).
    #[error("{}", MSG_LEASE_EXISTS)]
    LeaseExists,
    /// Refused input, with the shard's etcd message (e.g. "etcdserver: key not found").
    #[error("{0}")]
    InvalidArgument(String),
    /// A key is locked by an in-flight cross-shard txn; nothing was written.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The cross-shard txn was aborted; nothing was written.
    #[error("transaction aborted: {0}")]
    TxnAborted(String),
    /// The shard is not the raft leader.
    #[error("not leader: {0}")]
    NotLeader(String),
    /// The shard said it cannot serve right now.
    #[error("shard unavailable: {0}")]
    ShardUnavailable(String),
    /// The shard hit an internal error.
    #[error("{0}")]
    Internal(String),

    // ---- transport ----
    /// Could not connect; the request was certainly not sent.
    #[error("cannot connect to shard {shard} at {addr}: {reason}")]
    ConnectFailed {
        shard: u32,
        addr: String,
        reason: String,
    },
    /// The connection broke while the request was in flight: outcome unknown.
    #[error("connection to shard {shard} lost")]
    ConnectionLost { shard: u32 },
    /// No response within the request timeout: outcome unknown.
    #[error("request to shard {shard} timed out")]
    Timeout { shard: u32 },
    /// The shard answered something that does not fit the request.
    #[error("shard protocol error: {0}")]
    Protocol(String),

    /// Conflict/abort retries ran out (the last error is kept for logs).
    #[error("retries exhausted: {0}")]
    RetriesExhausted(Box<GatewayError>),
    /// A feature the gateway does not serve.
    #[error("{0}")]
    Unimplemented(String),
}

pub type Result<T, E = GatewayError> = std::result::Result<T, E>;

impl GatewayError {
    /// Maps a shard's error answer to its variant.
    pub fn from_shard(err: ShardError) -> GatewayError {
        let msg = err.message;
        match Code::try_from(err.code).unwrap_or(Code::Internal) {
            Code::Compacted => GatewayError::Compacted,
            Code::FutureRevision => GatewayError::FutureRevision,
            Code::Conflict => GatewayError::Conflict(msg),
            Code::TxnAborted => GatewayError::TxnAborted(msg),
            Code::InvalidArgument => GatewayError::InvalidArgument(msg),
            Code::NotLeader => GatewayError::NotLeader(msg),
            Code::Unavailable => GatewayError::ShardUnavailable(msg),
            Code::Internal => GatewayError::Internal(msg),
            Code::LeaseNotFound => GatewayError::LeaseNotFound,
            Code::LeaseExists => GatewayError::LeaseExists,
        }
    }

    /// Whether retrying the same request (after a backoff) may succeed and
    /// is known to be safe: nothing was applied by the failed attempt.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            GatewayError::Conflict(_)
                | GatewayError::TxnAborted(_)
                | GatewayError::ConnectFailed { .. }
                | GatewayError::NotLeader(_)
                | GatewayError::ShardUnavailable(_)
        )
    }

    /// Whether the request may have been applied although it failed
    /// (the shard got it but the answer was lost).
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self,
            GatewayError::ConnectionLost { .. } | GatewayError::Timeout { .. }
        )
    }

    /// The gRPC status etcd would answer. The only place statuses are made.
    pub fn to_status(&self) -> Status {
        use GatewayError::*;
        match self {
            KeyNotProvided | TooManyOps | DuplicateKey | ValueProvided | LeaseProvided
            | RequestTooLarge | InvalidSortOption => {
                Status::new(GrpcCode::InvalidArgument, self.to_string())
            }
            InvalidArgument(msg) => Status::new(GrpcCode::InvalidArgument, msg.clone()),
            Compacted => Status::new(GrpcCode::OutOfRange, MSG_COMPACTED),
            FutureRevision => Status::new(GrpcCode::OutOfRange, MSG_FUTURE_REV),
            LeaseNotFound => Status::new(GrpcCode::NotFound, MSG_LEASE_NOT_FOUND),
            LeaseExists => Status::new(GrpcCode::FailedPrecondition, MSG_LEASE_EXISTS),
            LeaseTtlTooLarge => Status::new(GrpcCode::OutOfRange, MSG_LEASE_TTL_TOO_LARGE),
            Conflict(_)
            | TxnAborted(_)
            | NotLeader(_)
            | ShardUnavailable(_)
            | ConnectFailed { .. }
            | ConnectionLost { .. }
            | Timeout { .. }
            | RetriesExhausted(_) => Status::new(GrpcCode::Unavailable, MSG_TIMEOUT),
            // etcd answers unknown server errors with codes.Unknown.
            Internal(msg) => Status::new(GrpcCode::Unknown, msg.clone()),
            Protocol(msg) => Status::new(GrpcCode::Internal, msg.clone()),
            Unimplemented(msg) => Status::new(GrpcCode::Unimplemented, msg.clone()),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Status {
        e.to_status()
    }
}

impl From<TxnCheckError> for GatewayError {
    fn from(e: TxnCheckError) -> GatewayError {
        match e {
            TxnCheckError::TooManyOps => GatewayError::TooManyOps,
            TxnCheckError::DuplicateKey => GatewayError::DuplicateKey,
            TxnCheckError::EmptyKey => GatewayError::KeyNotProvided,
            TxnCheckError::EmptyOp => GatewayError::InvalidArgument(MSG_KEY_NOT_FOUND.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(code: Code, msg: &str) -> GatewayError {
        GatewayError::from_shard(ShardError {
            code: code as i32,
            message: msg.into(),
        })
    }

    #[test]
    fn shard_errors_map_to_etcd_statuses() {
        let s = shard(Code::Compacted, "whatever").to_status();
        assert_eq!(s.code(), GrpcCode::OutOfRange);
        assert_eq!(s.message(), MSG_COMPACTED);

        let s = shard(Code::FutureRevision, "").to_status();
        assert_eq!(s.code(), GrpcCode::OutOfRange);
        assert_eq!(s.message(), MSG_FUTURE_REV);

        let s = shard(Code::InvalidArgument, "etcdserver: key not found").to_status();
        assert_eq!(s.code(), GrpcCode::InvalidArgument);
        assert_eq!(s.message(), "etcdserver: key not found");

        for code in [
            Code::Unavailable,
            Code::NotLeader,
            Code::Conflict,
            Code::TxnAborted,
        ] {
            let s = shard(code, "x").to_status();
            assert_eq!(s.code(), GrpcCode::Unavailable, "{code:?}");
            assert_eq!(s.message(), MSG_TIMEOUT);
        }
        let s = shard(Code::Internal, "boom").to_status();
        assert_eq!(s.code(), GrpcCode::Unknown);
        assert_eq!(s.message(), "boom");
        // An unknown code from a newer shard is treated as internal.
        let e = GatewayError::from_shard(ShardError {
            code: 999,
            message: "new".into(),
        });
        assert_eq!(e, GatewayError::Internal("new".into()));
    }

    #[test]
    fn gateway_checks_map_to_invalid_argument() {
        let cases = [
            (GatewayError::KeyNotProvided, MSG_EMPTY_KEY),
            (GatewayError::TooManyOps, MSG_TOO_MANY_OPS),
            (GatewayError::DuplicateKey, MSG_DUPLICATE_KEY),
            (GatewayError::ValueProvided, MSG_VALUE_PROVIDED),
            (GatewayError::LeaseProvided, MSG_LEASE_PROVIDED),
            (GatewayError::RequestTooLarge, MSG_TOO_LARGE),
            (GatewayError::InvalidSortOption, MSG_INVALID_SORT),
        ];
        for (e, msg) in cases {
            let s: Status = e.into();
            assert_eq!(s.code(), GrpcCode::InvalidArgument);
            assert_eq!(s.message(), msg);
        }
        assert_eq!(
            GatewayError::from(TxnCheckError::EmptyKey),
            GatewayError::KeyNotProvided
        );
    }

    #[test]
    fn transport_failures_and_exhausted_retries_are_timeouts() {
        for e in [
            GatewayError::Timeout { shard: 1 },
            GatewayError::ConnectionLost { shard: 0 },
            GatewayError::ConnectFailed {
                shard: 0,
                addr: "x".into(),
                reason: "refused".into(),
            },
            GatewayError::RetriesExhausted(Box::new(GatewayError::Conflict("k".into()))),
        ] {
            let s = e.to_status();
            assert_eq!(s.code(), GrpcCode::Unavailable);
            assert_eq!(s.message(), MSG_TIMEOUT);
        }
        assert!(GatewayError::Conflict(String::new()).is_retryable());
        assert!(!GatewayError::Timeout { shard: 0 }.is_retryable());
        assert!(GatewayError::Timeout { shard: 0 }.is_ambiguous());
        assert!(!GatewayError::Compacted.is_retryable());
    }
}
