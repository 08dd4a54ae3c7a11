//! Regression: a compaction whose fdatasync failed (EIO) left the new compacted segment
//! behind under its final name; its removal was an unsynced directory operation, so a
//! crash could bring back a compacted segment whose pages were never synced, and the
//! next open refused the store as corrupt. Compacted segments are now written under a
//! temporary name and renamed only after their data is durable; leftovers are removed.

use std::sync::Arc;

use repl_engine::{ManualClock, SimConfig, SimStorage, Store};
use repl_tests::options;
use repl_wire::{Collection, StreamId};

#[test]
fn a_failed_compaction_never_leaves_an_unreadable_segment() {
    let clock = Arc::new(ManualClock::new(5_000));
    for seed in 0..64 {
        let disk = SimStorage::new(SimConfig { seed, ..SimConfig::default() });
        let store = Store::open(Arc::new(disk.clone()), options(&clock, 8 * 1024)).expect("open");
        for i in 0..40u32 {
            store.put(Collection::Users, format!("k{}", i % 5).as_bytes(), &vec![i as u8; 300]).expect("put");
        }
        disk.set_fail_syncs_from(Some(disk.syncs()));
        let horizon = store.vector(StreamId::Enterprise);
        assert!(store.compact(StreamId::Enterprise, &horizon).is_err(), "the sync fails");
        assert!(store.is_poisoned());
        drop(store);
        let reopened = Store::open(Arc::new(disk.crash()), options(&clock, 8 * 1024))
            .unwrap_or_else(|e| panic!("seed {seed}: reopen after a failed compaction: {e}"));
        for k in 0..5u32 {
            let want = vec![(35 + k) as u8; 300];
            let got = reopened.get(Collection::Users, format!("k{k}").as_bytes()).expect("read");
            assert_eq!(got.value(), Some(&want[..]), "seed {seed}: k{k}");
        }
    }
}
