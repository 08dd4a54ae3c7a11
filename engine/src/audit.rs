//! Audit records: a per-origin blake3 hash chain for tamper evidence, and in-memory
//! indexes by time, user and appliance so queries never scan the log.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

pub use repl_wire::AuditEvent;
use repl_wire::{Dot, Incarnation};
use serde::{Deserialize, Serialize};

/// An audit event as stored: the event plus the hash of the previous record of the
/// same origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The event.
    pub event: AuditEvent,
    /// blake3 chain hash of the origin's previous record (zeros for the first).
    pub prev_hash: [u8; 32],
}

/// A stored audit record and the write that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAudit {
    /// The record's dot in the audit stream.
    pub dot: Dot,
    /// The record.
    pub record: AuditRecord,
}

/// Which audit records a query wants. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Inclusive lower bound on `time_ms`.
    pub from_ms: Option<u64>,
    /// Exclusive upper bound on `time_ms`.
    pub until_ms: Option<u64>,
    /// Only this user's records.
    pub user: Option<String>,
    /// Only records of this appliance.
    pub appliance: Option<String>,
    /// At most this many records (oldest first).
    pub limit: Option<usize>,
}

/// The chain hash of a record: blake3(prev || origin || seq || value bytes).
pub(crate) fn chain_hash(prev: &[u8; 32], dot: Dot, value: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&dot.origin.0.to_le_bytes());
    h.update(&dot.seq.to_le_bytes());
    h.update(value);
    *h.finalize().as_bytes()
}

/// The key an audit record is stored under: origin then sequence, big-endian, so
/// key order is each origin's chain order.
pub(crate) fn audit_key(dot: Dot) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&dot.origin.0.to_be_bytes());
    k.extend_from_slice(&dot.seq.to_be_bytes());
    k
}

/// Indexes over the durable audit records and the chain heads of what was submitted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AuditIndex {
    pub(crate) heads: BTreeMap<Incarnation, [u8; 32]>,
    by_time: BTreeSet<(u64, Dot)>,
    by_user: BTreeSet<(String, u64, Dot)>,
    by_appliance: BTreeSet<(String, u64, Dot)>,
}

impl AuditIndex {
    pub(crate) fn insert(&mut self, dot: Dot, event: &AuditEvent) {
        self.by_time.insert((event.time_ms, dot));
        self.by_user.insert((event.user.clone(), event.time_ms, dot));
        self.by_appliance.insert((event.appliance.clone(), event.time_ms, dot));
    }

    /// Dots matching the query, oldest first, through the most selective index.
    pub(crate) fn query(&self, q: &AuditQuery) -> Vec<Dot> {
        let from = q.from_ms.unwrap_or(0);
        let until = q.until_ms.unwrap_or(u64::MAX);
        let limit = q.limit.unwrap_or(usize::MAX);
        let in_time = |t: u64| t >= from && t < until;
        let lo = Dot { origin: Incarnation(0), seq: 0 };
        let named = |set: &BTreeSet<(String, u64, Dot)>, name: &str| -> Vec<(u64, Dot)> {
            set.range((Bound::Included((name.to_string(), from, lo)), Bound::Unbounded))
                .take_while(|(n, t, _)| n == name && *t < until)
                .map(|(_, t, d)| (*t, *d))
                .collect()
        };
        let candidates: Vec<(u64, Dot)> = match (&q.user, &q.appliance) {
            (Some(user), _) => named(&self.by_user, user),
            (None, Some(appliance)) => named(&self.by_appliance, appliance),
            (None, None) => self
                .by_time
                .range((Bound::Included((from, lo)), Bound::Unbounded))
                .take_while(|(t, _)| *t < until)
                .copied()
                .collect(),
        };
        candidates
            .into_iter()
            .filter(|(t, d)| {
                in_time(*t)
                    && q.appliance
                        .as_ref()
                        .is_none_or(|a| q.user.is_none() || self.by_appliance.contains(&(a.clone(), *t, *d)))
            })
            .map(|(_, d)| d)
            .take(limit)
            .collect()
    }
}
