//! Pure helpers over etcd range requests, shared by the gateway and the
//! shards, so both read etcd's rules the same way.

use crate::etcdserverpb::{range_request::SortOrder, RangeRequest};

/// Whether `req` filters by mod or create revision.
pub fn revision_filtered(req: &RangeRequest) -> bool {
    req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0
}

/// Whether etcd reads only the first `limit + 1` keys of `req`'s range (in
/// key order) before it sorts them (its `rangeLimit`): a limit, no sort
/// order asked for, no revision filter. A sort target other than the key
/// without an order still sorts, ascending, but only those keys.
pub fn reads_first_page_only(req: &RangeRequest) -> bool {
    req.limit > 0
        && SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None) == SortOrder::None
        && !revision_filtered(req)
}
