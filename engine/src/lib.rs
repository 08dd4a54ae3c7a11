//! `repl-engine`: the embedded replication storage engine of repl.
//!
//! What it does: stores every record kind of the product durably in one log per
//! stream (enterprise, sessions, audit) with group commit, keeps an in-memory keydir
//! over the log (Bitcask-style), versions every key with dotted version vectors,
//! resolves concurrent writes per collection policy without losing any, chains audit
//! records for tamper evidence, and hands replication what it needs: per-stream
//! vectors, log floors and the entries above a peer's vector.
//!
//! What it does not do: networking, threads of its own, or reading the clock. All I/O
//! goes through the [`Storage`] trait (real files or the simulated disk) and time
//! through the [`Clock`] given in [`StoreOptions`].
//!
//! Start with [`Store::open_dir`] (or [`Store::open`] on a [`SimStorage`] in tests).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod audit;
mod clock;
mod error;
mod keydir;
mod keyhash;
pub mod membership;
mod options;
mod records;
pub mod rng;
pub mod routing;
#[cfg(feature = "runtime")]
pub mod runtime;
mod segment;
mod storage;
mod store;
mod stream;
pub mod sync;
pub mod topology;
pub mod tree;
mod versions;

pub use audit::{AuditEvent, AuditQuery, AuditRecord, StoredAudit};
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Corruption, Error, Result};
pub use options::{
    StoreOptions, SyncPoint, BUFFERED_BYTES_MAX, CONFLICT_RECORDS_MAX, LOG_RETAINED_BYTES_MAX,
    SEGMENT_BYTES_DEFAULT,
};
pub use records::{ComputerPolicy, Record, Session, SsoEnrollment, TopologyRecord, User, UserPolicy};
pub use storage::{
    write_file_atomically, FileStorage, SimConfig, SimStorage, Storage, StorageFile, SyncLatency,
    SYNC_LATENCY_BOUNDS_US,
};
pub use store::{Durability, PendingWrite, Read, Recovery, Store, Value, WriteBatch};
pub use stream::{CompactionReport, ConflictRecord, StreamRecovery};
pub use versions::{ConflictPolicy, SIBLINGS_MAX};
