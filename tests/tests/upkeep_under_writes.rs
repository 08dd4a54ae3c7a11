//! Checkpoints and compactions run while writers commit (they no longer hold the
//! commit path's I/O lock): every acknowledged write must be readable, with its
//! latest value, during the run, after it, and after a reopen from the files.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use repl_engine::{Store, StoreOptions};
use repl_wire::{Collection, StreamId};

const WRITERS: u64 = 4;
const KEYS_PER_WRITER: u64 = 300;
const ROUNDS: u64 = 6;

fn options() -> StoreOptions {
    // Small segments: the writes seal dozens, so compaction has work every round.
    StoreOptions { segment_bytes: 32 * 1024, ..StoreOptions::default() }
}

fn key(w: u64, k: u64) -> Vec<u8> {
    format!("w{w}-k{k:04}").into_bytes()
}

fn value(w: u64, k: u64, round: u64) -> Vec<u8> {
    let mut v = format!("w{w}-k{k}-r{round}-").into_bytes();
    v.resize(120, b'.');
    v
}

/// The value of every key as its writer last had it acknowledged.
fn expected() -> BTreeMap<Vec<u8>, Vec<u8>> {
    (0..WRITERS)
        .flat_map(|w| (0..KEYS_PER_WRITER).map(move |k| (key(w, k), value(w, k, ROUNDS - 1))))
        .collect()
}

fn check(store: &Store, when: &str) {
    for (k, v) in expected() {
        let read = store.get(Collection::Users, &k).expect("read");
        assert_eq!(read.value(), Some(v.as_slice()), "{when}: {}", String::from_utf8_lossy(&k));
    }
}

#[test]
fn checkpoints_and_compactions_beside_writers_lose_nothing() {
    let dir = tempfile::tempdir().expect("dir");
    let store = Store::open_dir(dir.path(), options()).expect("open");
    let done = AtomicBool::new(false);
    let compacted = AtomicU64::new(0);
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = &store;
                s.spawn(move || {
                    for round in 0..ROUNDS {
                        for k in 0..KEYS_PER_WRITER {
                            store
                                .put(Collection::Users, &key(w, k), &value(w, k, round))
                                .expect("durable put");
                            // What this writer was acknowledged is readable at once.
                            let read = store.get(Collection::Users, &key(w, k)).expect("read");
                            assert_eq!(read.value(), Some(value(w, k, round).as_slice()));
                        }
                    }
                })
            })
            .collect();
        let upkeep = s.spawn(|| {
            let mut rounds = 0u64;
            while !done.load(Ordering::Acquire) || rounds < 3 {
                let horizon = store.vector(StreamId::Enterprise);
                let report = store.compact(StreamId::Enterprise, &horizon).expect("compact");
                compacted.fetch_add(report.segments_compacted as u64, Ordering::Relaxed);
                store.checkpoint().expect("checkpoint");
                rounds += 1;
            }
        });
        for w in writers {
            w.join().expect("writer");
        }
        done.store(true, Ordering::Release);
        upkeep.join().expect("upkeep");
    });
    assert!(compacted.load(Ordering::Relaxed) > 0, "no compaction ran beside the writers");
    check(&store, "after the run");
    drop(store);
    let store = Store::open_dir(dir.path(), options()).expect("reopen");
    check(&store, "after a reopen");
}
