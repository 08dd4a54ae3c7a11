use std::collections::BTreeMap;
use std::sync::Arc;

use repl_wire::Collection;

use crate::clock::{Clock, SystemClock};
use crate::versions::ConflictPolicy;

/// Bytes a log segment is preallocated to.
pub const SEGMENT_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// Past this many bytes of log per stream, the oldest segments are compacted even if a
/// peer has not acknowledged them; that peer then needs anti-entropy.
pub const LOG_RETAINED_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Conflict records kept per collection; older ones are dropped and counted.
pub const CONFLICT_RECORDS_MAX: usize = 1024;
/// Bytes of buffered (not yet durable) writes after which a writer commits inline.
pub const BUFFERED_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A sync call in the write path. Tests switch one off (see
/// [`StoreOptions::unsafe_skip_sync`]) to show that the power-cut tests catch its loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SyncPoint {
    /// fdatasync of a log segment after appending a commit group.
    LogAppend,
    /// fdatasync of a new log segment's header, before any frame goes into it.
    SegmentHeader,
    /// Directory fsync after a new log segment was created.
    SegmentCreateDir,
    /// fdatasync of a compacted segment before the keydir points into it.
    CompactedData,
    /// fdatasync of a hint file before it is renamed into place.
    HintData,
    /// Directory fsync after the hint rename.
    HintDir,
    /// fdatasync of the identity file before it is renamed into place.
    IdentityData,
    /// Directory fsync after the identity file is renamed into place.
    IdentityDir,
}

impl SyncPoint {
    /// Every sync point, for tests that remove each in turn.
    pub const ALL: [SyncPoint; 8] = [
        SyncPoint::LogAppend,
        SyncPoint::SegmentHeader,
        SyncPoint::SegmentCreateDir,
        SyncPoint::CompactedData,
        SyncPoint::HintData,
        SyncPoint::HintDir,
        SyncPoint::IdentityData,
        SyncPoint::IdentityDir,
    ];
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Bytes each log segment is preallocated to.
    pub segment_bytes: u64,
    /// Log bytes per stream kept for replication before compaction is forced.
    pub log_retained_bytes_max: u64,
    /// Conflict policy per collection; collections not named use LWW.
    pub policies: BTreeMap<Collection, ConflictPolicy>,
    /// The wall clock (a manual one in tests and the simulator).
    pub clock: Arc<dyn Clock>,
    /// On an appliance that forwards audit records to holders: the most own audit
    /// records not yet acknowledged by every holder. Past it, new audit records are
    /// refused (`AuditBacklogFull`): fail closed rather than drop. `None` on holders.
    pub audit_backlog_max: Option<u64>,
    /// The incarnation to take when the store is created; random when `None`. The
    /// simulator sets it so a seed replays exactly.
    pub incarnation_seed: Option<u64>,
    /// Test-only: skip one sync call to prove the crash tests notice. Never set this
    /// outside tests; it breaks durability by design.
    #[doc(hidden)]
    pub unsafe_skip_sync: Option<SyncPoint>,
    /// Test-only: apply remote entries that skip ahead of their origin's sequence
    /// instead of refusing the gap. A planted bug the simulator must catch.
    #[doc(hidden)]
    pub unsafe_skip_order_check: bool,
    /// Test-only: let replication read queued (not yet durable) entries. A planted bug
    /// the simulator must catch: a crash can then reuse a sequence number a peer holds.
    #[doc(hidden)]
    pub unsafe_ship_buffered: bool,
    /// Test-only: collect every tombstone at once, before every replica has seen it.
    /// A planted bug the simulator must catch: a deleted record can come back.
    #[doc(hidden)]
    pub unsafe_collect_tombstones_early: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            log_retained_bytes_max: LOG_RETAINED_BYTES_MAX,
            policies: BTreeMap::new(),
            clock: Arc::new(SystemClock),
            audit_backlog_max: None,
            incarnation_seed: None,
            unsafe_skip_sync: None,
            unsafe_skip_order_check: false,
            unsafe_ship_buffered: false,
            unsafe_collect_tombstones_early: false,
        }
    }
}

impl StoreOptions {
    pub(crate) fn policy(&self, c: Collection) -> ConflictPolicy {
        self.policies.get(&c).copied().unwrap_or_default()
    }

    pub(crate) fn syncs(&self, point: SyncPoint) -> bool {
        self.unsafe_skip_sync != Some(point)
    }
}
