//! Log upkeep of a running node: compaction below what the peers acknowledged
//! (retention), tombstone collection and periodic checkpoints, on the schedule of
//! [`MaintenanceConfig`]. The store holds the rules (what may be compacted or
//! collected); this module only feeds it the peers' acknowledged vectors.
//!
//! The horizon of a stream is the meet of the acknowledged vectors of every
//! appliance the topology sends the stream to, connected or not; a peer this node has
//! not heard from since it started counts as having acknowledged nothing, so a restart
//! never lets the log be cut below a peer that is away. Past
//! `StoreOptions::log_retained_bytes_max` the store compacts anyway (a dead peer must
//! not fill the disk): that is counted and logged as an alarm, and the laggard repairs
//! by anti-entropy when it returns.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use repl_wire::{NodeId, StreamId, VersionVector};

use super::Shared;

/// What the node runtime does to keep the log and the restart time bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// How often to compact each stream's sealed segments below the retention
    /// horizon (`None`: never; the log then grows without bound).
    pub compact_every: Option<Duration>,
    /// How often to collect tombstones every replica acknowledged (`None`: never).
    pub collect_tombstones_every: Option<Duration>,
    /// How often to write a checkpoint while the store changes, so a restart after a
    /// crash replays at most this much of the log (`None`: only at a clean stop and
    /// after a compaction).
    pub checkpoint_every: Option<Duration>,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        MaintenanceConfig {
            // A compaction check is cheap unless a sealed segment fell below the
            // horizon; collection and checkpoints walk the whole keydir.
            compact_every: Some(Duration::from_secs(10)),
            collect_tombstones_every: Some(Duration::from_secs(60)),
            checkpoint_every: Some(Duration::from_secs(300)),
        }
    }
}

impl MaintenanceConfig {
    /// No background upkeep at all (benchmarks that measure the replication path alone).
    pub fn off() -> MaintenanceConfig {
        MaintenanceConfig { compact_every: None, collect_tombstones_every: None, checkpoint_every: None }
    }
}

/// When each kind of upkeep last ran, and what the store looked like then.
#[derive(Debug)]
pub(super) struct Schedule {
    compacted: Instant,
    collected: Instant,
    checkpointed: Instant,
    /// The vectors at the last checkpoint: none is written while nothing changed.
    checkpointed_at: Vec<VersionVector>,
    /// Per stream, the local and acknowledged vectors of the last tombstone collection:
    /// a collection walks the whole keydir, and finds nothing new while they stand still.
    collected_at: BTreeMap<StreamId, (VersionVector, Vec<VersionVector>)>,
}

impl Schedule {
    pub(super) fn new(now: Instant) -> Schedule {
        Schedule {
            compacted: now,
            collected: now,
            checkpointed: now,
            checkpointed_at: Vec::new(),
            collected_at: BTreeMap::new(),
        }
    }
}

/// Whether `every` has passed since `last` (and then restarts the period).
fn due(last: &mut Instant, every: Option<Duration>, now: Instant) -> bool {
    match every {
        Some(every) if now.duration_since(*last) >= every => {
            *last = now;
            true
        }
        _ => false,
    }
}

/// Runs whatever upkeep is due. Called from the housekeeping task, on a thread that
/// may block.
pub(super) fn run(shared: &Shared, schedule: &mut Schedule, now: Instant) {
    let config = shared.config.maintenance;
    if due(&mut schedule.compacted, config.compact_every, now) {
        for stream in StreamId::ALL {
            compact(shared, stream);
        }
    }
    if due(&mut schedule.collected, config.collect_tombstones_every, now) {
        for stream in [StreamId::Enterprise, StreamId::Sessions] {
            let acked = acknowledged(shared, stream);
            let seen = (shared.store.vector(stream), acked);
            if schedule.collected_at.get(&stream) == Some(&seen) {
                continue;
            }
            let collected = shared.store.collect_tombstones(stream, &seen.1);
            schedule.collected_at.insert(stream, seen);
            if collected > 0 {
                shared.state().tombstones_collected += collected as u64;
                tracing::debug!(?stream, collected, "tombstones collected: every replica acknowledged them");
            }
        }
    }
    if due(&mut schedule.checkpointed, config.checkpoint_every, now) {
        let vectors: Vec<VersionVector> = StreamId::ALL.iter().map(|s| shared.store.vector(*s)).collect();
        if vectors != schedule.checkpointed_at {
            match shared.store.checkpoint() {
                Ok(()) => schedule.checkpointed_at = vectors,
                Err(e) => {
                    tracing::error!(error = %e, "periodic checkpoint failed");
                    shared.error(format!("periodic checkpoint failed: {e}"));
                }
            }
        }
    }
}

/// The vector each appliance this node sends `stream` to has acknowledged (empty for
/// one not heard from since this node started).
pub(super) fn acknowledged(shared: &Shared, stream: StreamId) -> Vec<VersionVector> {
    let topology = shared.topology();
    let me = &shared.config.me;
    let receivers: Vec<&NodeId> = topology
        .appliances
        .iter()
        .filter(|a| &a.id != me && topology.scope(me, &a.id).send.contains(&stream))
        .map(|a| &a.id)
        .collect();
    let state = shared.state();
    receivers
        .into_iter()
        .map(|id| state.peers.get(id).and_then(|p| p.acked.get(&stream)).cloned().unwrap_or_default())
        .collect()
}

/// Compacts `stream` below the meet of its receivers' acknowledgements.
fn compact(shared: &Shared, stream: StreamId) {
    let horizon = acknowledged(shared, stream).iter().fold(shared.store.vector(stream), |h, a| h.meet(a));
    match shared.store.compact(stream, &horizon) {
        Ok(report) if report.segments_compacted > 0 => {
            {
                let mut state = shared.state();
                state.segments_compacted += report.segments_compacted as u64;
                state.compactions_forced += u64::from(report.forced);
            }
            if report.forced {
                tracing::warn!(
                    ?stream,
                    segments = report.segments_compacted,
                    "log retention limit reached: compacted below a peer's acknowledgement; \
                     that peer will repair by anti-entropy"
                );
            } else {
                tracing::debug!(
                    ?stream,
                    segments = report.segments_compacted,
                    kept = report.entries_kept,
                    "log compacted"
                );
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(?stream, error = %e, "compaction failed");
            shared.error(format!("compaction of {stream:?} failed: {e}"));
        }
    }
}
