//! Shared helpers for the integration, crash and simulation tests.

use std::sync::Arc;

use repl_engine::{ManualClock, SimConfig, SimStorage, Store, StoreOptions};

/// Options with a manual clock at `now_ms` and small segments so tests roll over.
pub fn options(clock: &Arc<ManualClock>, segment_bytes: u64) -> StoreOptions {
    StoreOptions {
        segment_bytes,
        clock: clock.clone(),
        incarnation_seed: Some(0xA11CE),
        ..StoreOptions::default()
    }
}

/// A store on a fresh simulated disk.
pub fn sim_store(seed: u64) -> (SimStorage, Store, Arc<ManualClock>) {
    let disk = SimStorage::new(SimConfig { seed, ..SimConfig::default() });
    let clock = Arc::new(ManualClock::new(1_000_000));
    let store = Store::open(Arc::new(disk.clone()), options(&clock, 16 * 1024))
        .expect("open a fresh simulated store");
    (disk, store, clock)
}

pub mod net;
pub mod sim;

/// The seed to use: `SEED` from the environment when set (to replay a failure).
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
