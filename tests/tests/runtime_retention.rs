//! The node runtime keeps the log bounded: it compacts segments once every peer
//! acknowledged them, collects tombstones every replica acknowledged, and when a peer
//! stays away past the retention limit compacts anyway (an alarm) and the peer repairs
//! by anti-entropy when it returns. Real appliances over QUIC on loopback, real files.

use std::path::Path;
use std::time::Duration;

use repl_engine::runtime::{MaintenanceConfig, Node};
use repl_engine::{Durability, Store, StoreOptions, WriteBatch};
use repl_tests::net::{wait_until, AppliancePair};
use repl_wire::{Collection, StreamId};

/// Small segments, so a few hundred KB of writes seal many of them.
const SEGMENT_BYTES: u64 = 64 * 1024;
/// Retention limit: a peer away for more than this much log is left to anti-entropy.
const RETAINED_BYTES: u64 = 1024 * 1024;

fn options() -> StoreOptions {
    StoreOptions {
        segment_bytes: SEGMENT_BYTES,
        log_retained_bytes_max: RETAINED_BYTES,
        ..StoreOptions::default()
    }
}

/// Log segments of the enterprise stream in `dir`.
fn log_segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .expect("data dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("enterprise-") && name.ends_with(".log")
        })
        .count()
}

fn write_users(node: &Node, range: std::ops::Range<u32>) {
    for chunk in range.collect::<Vec<_>>().chunks(100) {
        let mut batch = WriteBatch::new();
        for i in chunk {
            batch.put(Collection::Users, format!("user{i:05}").as_bytes(), &[b'v'; 300]);
        }
        node.store().write(batch, Durability::Durable).expect("write users");
    }
    node.notify();
}

fn has(node: &Node, i: u32) -> bool {
    node.store().get(Collection::Users, format!("user{i:05}").as_bytes()).is_ok_and(|r| r.value().is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_under_acknowledgements_and_a_long_absence_is_repaired() {
    let pair = AppliancePair::default();
    let start = |i: usize| {
        pair.start(i, options(), |config| {
            config.maintenance = MaintenanceConfig {
                compact_every: Some(Duration::from_millis(100)),
                collect_tombstones_every: Some(Duration::from_millis(100)),
                checkpoint_every: None,
            };
        })
    };
    let a1 = start(0).await;
    let b1 = start(1).await;

    // About 340 KB of users seals five segments on a1; once b1 acknowledged them
    // they are compacted away, and both replicas still hold every user.
    write_users(&a1, 0..1_000);
    wait_until("every user on b1", Duration::from_secs(60), || (0..1_000).all(|i| has(&b1, i))).await;
    wait_until("a1 compacts what b1 acknowledged", Duration::from_secs(30), || {
        a1.status().segments_compacted > 0 && log_segments(pair.dir(0)) <= 3
    })
    .await;
    assert_eq!(a1.status().compactions_forced, 0, "a compaction went below a connected peer");
    assert!((0..1_000).all(|i| has(&a1, i)), "compaction lost a live user");

    // Deletes leave tombstones; once both replicas acknowledged them they are collected
    // on both, and the users stay deleted.
    let mut deletes = WriteBatch::new();
    for i in 0..100u32 {
        deletes.delete(Collection::Users, format!("user{i:05}").as_bytes(), None);
    }
    a1.store().write(deletes, Durability::Durable).expect("deletes");
    a1.notify();
    wait_until("tombstones collected on both", Duration::from_secs(30), || {
        a1.status().tombstones_collected >= 100 && b1.status().tombstones_collected >= 100
    })
    .await;
    assert!((0..100).all(|i| !has(&a1, i) && !has(&b1, i)), "a deleted user came back");

    // b1 stops; a1 writes 1.7 MB, more than the retention limit. It compacts anyway (the
    // alarm), so its log stays bounded.
    b1.shutdown(Duration::ZERO).await;
    write_users(&a1, 1_000..6_000);
    wait_until("a forced compaction on a1", Duration::from_secs(30), || a1.status().compactions_forced > 0)
        .await;
    let floor = a1.store().log_floors(StreamId::Enterprise)[&a1.store().incarnation()];
    let b1_dir_vector = {
        let b1_store = Store::open_dir(pair.dir(1), options()).expect("reopen b1's store to read it");
        b1_store.vector(StreamId::Enterprise).get(a1.store().incarnation())
    };
    assert!(floor > b1_dir_vector + 1, "a1's log still covers b1 (floor {floor}, b1 at {b1_dir_vector})");

    // b1 returns below a1's log floor: it repairs by anti-entropy and ends equal.
    let b1 = start(1).await;
    wait_until("b1 repaired after its long absence", Duration::from_secs(60), || {
        (1_000..6_000).all(|i| has(&b1, i))
    })
    .await;
    wait_until("equal digests", Duration::from_secs(30), || {
        a1.store().digest(StreamId::Enterprise).ok() == b1.store().digest(StreamId::Enterprise).ok()
    })
    .await;
    assert!((0..100).all(|i| !has(&b1, i)), "a collected delete came back through the repair");
    a1.shutdown(Duration::ZERO).await;
    b1.shutdown(Duration::ZERO).await;
}
