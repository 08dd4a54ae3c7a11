//! Checkpoints, compactions and the anti-entropy hash tree run while writers commit
//! (one group merging while the next is written): every acknowledged write must be
//! readable, with its latest value, during the run, after it, and after a reopen from
//! the files; the hash tree kept current through the run must equal one built anew.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::collections::VecDeque;

use repl_engine::tree::TREE_FANOUT;
use repl_engine::{Store, StoreOptions, WriteBatch};
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
                    // Odd writers keep several writes in flight, so groups overlap.
                    let window = if w % 2 == 1 { 16 } else { 1 };
                    let mut in_flight = VecDeque::new();
                    for round in 0..ROUNDS {
                        for k in 0..KEYS_PER_WRITER {
                            let mut b = WriteBatch::new();
                            b.put(Collection::Users, &key(w, k), &value(w, k, round));
                            in_flight.push_back((k, round, store.submit(b).expect("submit")));
                            while in_flight.len() >= window {
                                let (k, round, pending) = in_flight.pop_front().expect("non-empty");
                                pending.wait().expect("durable put");
                                // What this writer was acknowledged is readable at once
                                // (unless a later write of the key is queued behind it).
                                if !in_flight.iter().any(|(q, _, _)| *q == k) {
                                    let read = store.get(Collection::Users, &key(w, k)).expect("read");
                                    assert_eq!(read.value(), Some(value(w, k, round).as_slice()));
                                }
                            }
                        }
                    }
                    for (_, _, pending) in in_flight {
                        pending.wait().expect("durable put");
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
                // Builds the hash tree at once, then keeps it current through the run.
                store.tree_hashes(StreamId::Enterprise, 0, 1, &[0, 5, 11]);
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
    let buckets: Vec<u32> = (0..TREE_FANOUT).collect();
    let kept = store.tree_hashes(StreamId::Enterprise, 0, 1, &buckets);
    drop(store);
    let store = Store::open_dir(dir.path(), options()).expect("reopen");
    check(&store, "after a reopen");
    let built = store.tree_hashes(StreamId::Enterprise, 0, 1, &buckets);
    assert_eq!(kept, built, "the hash tree kept through the run differs from one built from the keys");
}
