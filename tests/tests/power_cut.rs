//! Power cuts at every sync point of a short workload (appends, segment rollover,
//! hint checkpoints, compaction) on the simulated disk: after each cut the store must
//! reopen with every acknowledged write, its incarnation, and the last acknowledged
//! checkpoint. The same sweep, with any one fsync or directory fsync switched off,
//! must find a violation: that is what proves the sweep can see a missing fsync.

use std::collections::BTreeMap;
use std::sync::Arc;

use repl_engine::{ManualClock, SimConfig, SimStorage, Store, StoreOptions, SyncPoint};
use repl_tests::seed_from_env;
use repl_wire::{Collection, StreamId};

const OPS: u32 = 160;
const KEYS: u32 = 12;

fn opts(clock: &Arc<ManualClock>, incarnation: u64, skip: Option<SyncPoint>) -> StoreOptions {
    StoreOptions {
        segment_bytes: 16 * 1024,
        clock: clock.clone(),
        incarnation_seed: Some(incarnation),
        unsafe_skip_sync: skip,
        ..StoreOptions::default()
    }
}

/// What the workload had acknowledged when the power went.
#[derive(Default)]
struct Acked {
    opened: bool,
    /// Per key: the acknowledged value (None = deleted).
    values: BTreeMap<u32, Option<Vec<u8>>>,
    /// The write that was in flight at the cut, which may or may not survive.
    in_flight: Option<(u32, Option<Vec<u8>>)>,
    /// Enterprise entries written since the last acknowledged checkpoint.
    since_checkpoint: Option<u64>,
}

fn value(i: u32) -> Vec<u8> {
    // Every fifth value spans pages, so a commit's frame can be half kept by a crash.
    let repeat = if i % 5 == 4 { 600 } else { 1 + (i as usize % 7) };
    format!("value-{i}-").repeat(repeat).into_bytes()
}

/// Runs the workload until it finishes or the first error (the power cut).
fn workload(disk: &SimStorage, clock: &Arc<ManualClock>, skip: Option<SyncPoint>) -> Acked {
    let mut acked = Acked::default();
    let Ok(store) = Store::open(Arc::new(disk.clone()), opts(clock, 0x1111, skip)) else { return acked };
    acked.opened = true;
    for i in 0..OPS {
        let key = i % KEYS;
        let name = format!("user{key}");
        let write = if i % 9 == 8 { None } else { Some(value(i)) };
        acked.in_flight = Some((key, write.clone()));
        let done = match &write {
            Some(v) => store.put(Collection::Users, name.as_bytes(), v),
            None => store.delete(Collection::Users, name.as_bytes()),
        };
        if done.is_err() {
            return acked;
        }
        acked.values.insert(key, write);
        acked.in_flight = None;
        acked.since_checkpoint = acked.since_checkpoint.map(|n| n + 1);
        // Compaction writes a hint when it compacts something; a checkpoint always does.
        let maintenance = if i % 40 == 39 {
            let horizon = store.vector(StreamId::Enterprise);
            store.compact(StreamId::Enterprise, &horizon).map(|r| r.segments_compacted > 0)
        } else if i % 15 == 14 {
            store.checkpoint().map(|()| true)
        } else {
            Ok(false)
        };
        match maintenance {
            Ok(true) => acked.since_checkpoint = Some(0),
            Ok(false) => {}
            Err(_) => return acked,
        }
    }
    acked
}

/// Reopens after the crash and checks everything acknowledged is there.
fn check(after: &SimStorage, clock: &Arc<ManualClock>, acked: &Acked) -> Result<(), String> {
    // A different seed: if the identity file was lost, a new incarnation would show.
    let store = match Store::open(Arc::new(after.clone()), opts(clock, 0x2222, None)) {
        Ok(s) => s,
        Err(_) if !acked.opened => return Ok(()),
        Err(e) => return Err(format!("reopen failed: {e}")),
    };
    if acked.opened && store.incarnation().0 != 0x1111 {
        return Err(format!("incarnation changed to {}", store.incarnation()));
    }
    for key in 0..KEYS {
        let got = store
            .get(Collection::Users, format!("user{key}").as_bytes())
            .map_err(|e| format!("read user{key}: {e}"))?
            .value()
            .map(|v| v.to_vec());
        let want = acked.values.get(&key).cloned().flatten();
        let maybe = acked.in_flight.as_ref().filter(|(k, _)| *k == key).map(|(_, v)| v.clone());
        if got != want && Some(&got) != maybe.as_ref() {
            return Err(format!("user{key}: acknowledged {want:?}, recovered {got:?}"));
        }
    }
    if let Some(since) = acked.since_checkpoint {
        let replayed = store.recovery().streams[&StreamId::Enterprise].entries_replayed;
        if replayed > since + 1 {
            return Err(format!("checkpoint lost: replayed {replayed} entries, {since} written after it"));
        }
    }
    Ok(())
}

/// Cuts the power at every sync index of the workload, for a few seeds each.
fn sweep(skip: Option<SyncPoint>, seeds: u64, base_seed: u64) -> Result<usize, String> {
    let clock = Arc::new(ManualClock::new(1_000_000));
    let probe = SimStorage::new(SimConfig::default());
    workload(&probe, &clock, skip);
    let syncs = probe.syncs();
    assert!(syncs > 50, "the workload makes enough sync calls to be interesting ({syncs})");
    let mut runs = 0;
    for cut in 0..=syncs {
        for s in 0..seeds {
            let seed = base_seed.wrapping_mul(31).wrapping_add(cut * 1_000 + s);
            let disk =
                SimStorage::new(SimConfig { seed, power_cut_at_sync: Some(cut), ..SimConfig::default() });
            let acked = workload(&disk, &clock, skip);
            let after = disk.crash();
            check(&after, &clock, &acked).map_err(|e| {
                format!("{e} (power cut at sync {cut}, seed {seed}; replay with SEED={base_seed})")
            })?;
            runs += 1;
        }
    }
    Ok(runs)
}

#[test]
fn every_acknowledged_write_survives_a_power_cut_at_every_sync_point() {
    let base = seed_from_env(7);
    let runs = sweep(None, 3, base).unwrap_or_else(|e| panic!("{e}"));
    assert!(runs > 150);
}

#[test]
fn removing_any_single_fsync_is_caught() {
    let base = seed_from_env(7);
    for point in SyncPoint::ALL {
        let outcome = sweep(Some(point), 3, base);
        assert!(
            outcome.is_err(),
            "with {point:?} skipped, no power cut lost anything: the sweep has no teeth there"
        );
    }
}
