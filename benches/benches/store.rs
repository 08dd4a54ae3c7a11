//! Store benchmarks: durable put throughput (1 writer, 8 pipelined writers, the batch
//! API) next to baselines at the same durability in the same run — a plain CRC-framed
//! append loop and redb, each syncing once per 1,000 records, and the plain log's
//! records from the 8 pipelined writers through a bare group commit (the most any
//! store reaches with that many writes in flight) — plus get throughput and
//! reopen/recovery time, and the keydir's memory per key.

#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use repl_benches::{key, key_spread, plain_log_append, quick, redb_create, redb_insert, value_256, GroupLog};
use repl_engine::{Durability, Store, StoreOptions, WriteBatch};
use repl_wire::Collection;

/// Counts live heap bytes while [`COUNTING`] is on, so the keydir's memory per key is
/// measured exactly. Off, it only forwards: eight writer threads adding to one shared
/// counter on every allocation would measure the counter's cache line, not the store.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static COUNTING: AtomicBool = AtomicBool::new(false);

#[allow(unsafe_code)] // GlobalAlloc is an unsafe trait; this only forwards to System and counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Ordering::Relaxed) {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PER_ITER: u64 = 8_000;
const WRITERS: u64 = 8;
const IN_FLIGHT: usize = 128;

fn open(dir: &std::path::Path) -> Store {
    Store::open_dir(dir, StoreOptions::default()).expect("open the bench store")
}

fn put_one_writer(store: &Store, base: u64, n: u64) {
    for i in base..base + n {
        store.put(Collection::Users, &key(i), &value_256(i)).expect("durable put");
    }
}

fn put_pipelined(store: &Store, base: u64, n: u64) {
    put_pipelined_keys(store, key, base, n);
}

fn put_pipelined_spread(store: &Store, base: u64, n: u64) {
    put_pipelined_keys(store, key_spread, base, n);
}

fn put_pipelined_keys(store: &Store, keys: fn(u64) -> [u8; 16], base: u64, n: u64) {
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let store = store.clone();
            s.spawn(move || {
                let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
                let per = n / WRITERS;
                for j in 0..per {
                    let i = base + w * per + j;
                    let mut b = WriteBatch::new();
                    b.put(Collection::Users, &keys(i), &value_256(i));
                    in_flight.push_back(store.submit(b).expect("submit"));
                    if in_flight.len() == IN_FLIGHT {
                        in_flight.pop_front().expect("non-empty").wait().expect("durable");
                    }
                }
                for p in in_flight {
                    p.wait().expect("durable");
                }
            });
        }
    });
}

/// The 8 writers' workload (each record the key and the value) through [`GroupLog`].
fn group_log_pipelined(log: &GroupLog, n: u64) {
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            s.spawn(move || {
                let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
                let per = n / WRITERS;
                for i in w * per..(w + 1) * per {
                    let mut record = key(i).to_vec();
                    record.extend_from_slice(&value_256(i));
                    in_flight.push_back(log.append(&record));
                    if in_flight.len() == IN_FLIGHT {
                        log.wait(in_flight.pop_front().expect("non-empty")).expect("group log sync");
                    }
                }
                for t in in_flight {
                    log.wait(t).expect("group log sync");
                }
            });
        }
    });
}

fn put_batches(store: &Store, base: u64, n: u64) {
    for chunk in (base..base + n).step_by(1_000) {
        let mut b = WriteBatch::new();
        for i in chunk..(chunk + 1_000).min(base + n) {
            b.put(Collection::Users, &key(i), &value_256(i));
        }
        store.write(b, Durability::Durable).expect("durable batch");
    }
}

fn durable_put(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_put_256B");
    g.throughput(Throughput::Elements(PER_ITER));
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { 8 }));
    let one_writer_n = if quick() { 200 } else { 2_000 };
    g.bench_function(BenchmarkId::new("store", "1_writer"), |b| {
        // One writer pays one fdatasync per put: measured on fewer puts, scaled.
        let dir = tempfile::tempdir().expect("tmp");
        let store = open(dir.path());
        let mut base = 0;
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                put_one_writer(&store, base, one_writer_n);
                base += one_writer_n;
            }
            start.elapsed().mul_f64(PER_ITER as f64 / one_writer_n as f64)
        });
    });
    for (name, f) in [
        ("8_writers_128_in_flight", put_pipelined as fn(&Store, u64, u64)),
        ("8_writers_128_in_flight_spread_keys", put_pipelined_spread),
        ("batch_api_1000", put_batches as fn(&Store, u64, u64)),
    ] {
        g.bench_function(BenchmarkId::new("store", name), |b| {
            let dir = tempfile::tempdir().expect("tmp");
            let store = open(dir.path());
            let mut base = 0;
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    f(&store, base, PER_ITER);
                    base += PER_ITER;
                }
                start.elapsed()
            });
        });
    }
    g.bench_function(BenchmarkId::new("baseline", "plain_crc_log_sync_per_1000"), |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().expect("tmp");
            let start = Instant::now();
            for _ in 0..iters {
                plain_log_append(dir.path(), PER_ITER, 1_000).expect("plain log");
            }
            start.elapsed()
        });
    });
    g.bench_function(BenchmarkId::new("baseline", "group_commit_log_8_writers_128_in_flight"), |b| {
        b.iter_custom(|iters| {
            let dir = tempfile::tempdir().expect("tmp");
            let start = Instant::now();
            for _ in 0..iters {
                let log = GroupLog::create(&dir.path().join("group.log")).expect("group log");
                group_log_pipelined(&log, PER_ITER);
            }
            start.elapsed()
        });
    });
    // redb keeps its database across iterations, as the store keeps its log and keydir:
    // both hold every key written so far. A fresh database per iteration (8,000 keys,
    // a tree of a few pages) is the figure earlier sessions quoted; kept beside it.
    for (name, keys) in [
        ("redb_commit_per_1000", key as fn(u64) -> [u8; 16]),
        ("redb_commit_per_1000_spread_keys", key_spread),
    ] {
        g.bench_function(BenchmarkId::new("baseline", name), |b| {
            let dir = tempfile::tempdir().expect("tmp");
            let db = redb_create(dir.path()).expect("redb");
            let mut base = 0;
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    redb_insert(&db, keys, base, PER_ITER, 1_000).expect("redb");
                    base += PER_ITER;
                }
                start.elapsed()
            });
        });
    }
    g.bench_function(BenchmarkId::new("baseline", "redb_fresh_db_commit_per_1000"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tmp");
                let start = Instant::now();
                let db = redb_create(dir.path()).expect("redb");
                redb_insert(&db, key, 0, PER_ITER, 1_000).expect("redb");
                total += start.elapsed();
            }
            total
        });
    });
    g.finish();
}

fn fill(store: &Store, n: u64) {
    for chunk in (0..n).step_by(10_000) {
        let mut b = WriteBatch::new();
        for i in chunk..(chunk + 10_000).min(n) {
            b.put(Collection::Users, &key(i), &value_256(i));
        }
        store.write(b, Durability::Durable).expect("fill");
    }
}

fn get(c: &mut Criterion) {
    let n = if quick() { 10_000 } else { 200_000 };
    let dir = tempfile::tempdir().expect("tmp");
    let store = open(dir.path());
    fill(&store, n);
    let mut g = c.benchmark_group("get_256B");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("store_random_keys", |b| {
        let mut x = 0x9e37_79b9_u64;
        b.iter(|| {
            for _ in 0..10_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let read = store.get(Collection::Users, &key(x % n)).expect("get");
                assert_eq!(read.values.len(), 1);
            }
        });
    });
    g.finish();
}

fn recovery(c: &mut Criterion) {
    let n = if quick() { 20_000 } else { 1_000_000 };
    let dir = tempfile::tempdir().expect("tmp");
    {
        let store = open(dir.path());
        fill(&store, n);
    }
    COUNTING.store(true, Ordering::SeqCst);
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let store = open(dir.path());
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    COUNTING.store(false, Ordering::SeqCst);
    // Frees of blocks allocated before counting began subtract too, so the counter
    // may wrap below zero; the difference taken modulo is still the net change.
    let live = after.wrapping_sub(before);
    println!(
        "keydir memory: {:.0} bytes per key ({n} keys of 16 B, {:.1} MiB live heap after open)",
        live as f64 / n as f64,
        live as f64 / (1 << 20) as f64
    );
    drop(store);
    let mut g = c.benchmark_group("reopen");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n));
    g.bench_function(BenchmarkId::new("full_replay", n), |b| {
        b.iter(|| open(dir.path()));
    });
    open(dir.path()).checkpoint().expect("checkpoint");
    g.bench_function(BenchmarkId::new("from_hint", n), |b| {
        b.iter(|| open(dir.path()));
    });
    g.finish();
}

criterion_group!(benches, durable_put, get, recovery);
criterion_main!(benches);
