//! Profiling aid: 8 writer threads, 128 writes in flight each, 256-byte values.
//! `cargo run --release -p repl-engine --example put_profile -- [DIR] [WRITES] [random|batch]`
//! (`random`: keys spread over the key space, as user and session ids are, instead of
//! eight ascending runs; `batch`: one thread writing batches of 1,000 instead).
//! `PUT_VALUE_BYTES` sets another value size (the replication bench also writes 2 KiB);
//! `PUT_SKIP_LOG_SYNC` leaves out the log's fdatasync (see below).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use repl_engine::{FileStorage, Store, StoreOptions, SyncPoint, WriteBatch};
use repl_wire::Collection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| std::env::temp_dir().join("repl-put-profile").display().to_string());
    let total: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(400_000);
    let random = args.get(3).is_some_and(|a| a == "random");
    let batch = args.get(3).is_some_and(|a| a == "batch");
    let size: usize = std::env::var("PUT_VALUE_BYTES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let value = vec![7u8; size];
    let value = &value;
    let _ = std::fs::remove_dir_all(&dir);
    // `PUT_SKIP_LOG_SYNC` (profiling only): no fdatasync per group, so the run is bound
    // by the CPU each put costs rather than by the disk's latency, which varies more.
    let options = if std::env::var_os("PUT_SKIP_LOG_SYNC").is_some() {
        StoreOptions { unsafe_skip_sync: Some(SyncPoint::LogAppend), ..StoreOptions::default() }
    } else {
        StoreOptions::default()
    };
    let storage = FileStorage::new(&dir).expect("data directory");
    let syncs = storage.sync_latency();
    let store = Store::open(Arc::new(storage), options).expect("open");
    let start = Instant::now();
    if batch {
        for first in (0..total).step_by(1_000) {
            let mut b = WriteBatch::new();
            for j in first..(first + 1_000).min(total) {
                b.put(Collection::Users, &key(j), value);
            }
            store.submit(b).expect("submit").wait().expect("durable");
        }
    }
    std::thread::scope(|s| {
        for w in (0..8u64).filter(|_| !batch) {
            let store = store.clone();
            s.spawn(move || {
                let mut in_flight = VecDeque::new();
                for j in 0..total / 8 {
                    let mut b = WriteBatch::new();
                    let n = if random {
                        (w * 1_000_000_007 + j).wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    } else {
                        w << 40 | j
                    };
                    b.put(Collection::Users, &key(n), value);
                    in_flight.push_back(store.submit(b).expect("submit"));
                    if in_flight.len() == 128 {
                        in_flight.pop_front().expect("non-empty").wait().expect("durable");
                    }
                }
                for p in in_flight {
                    p.wait().expect("durable");
                }
            });
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let count: u64 = syncs.counts().iter().sum();
    println!(
        "{total} durable puts in {secs:.2}s: {:.0}/s; {count} fdatasyncs, mean {:.0} us",
        total as f64 / secs,
        syncs.sum_us() as f64 / count.max(1) as f64
    );
    let _ = std::fs::remove_dir_all(&dir);
    // Out without dropping the store: freeing millions of keys would take a large part
    // of a profile of this process, and none of it is the put path.
    std::process::exit(0);
}

/// `user-` and `n` in 16 hex digits, written without format!, whose cost would be
/// counted in every put.
fn key(n: u64) -> [u8; 21] {
    let mut key = *b"user-0000000000000000";
    for (d, shift) in key[5..].iter_mut().zip((0..64).step_by(4).rev()) {
        *d = b"0123456789abcdef"[(n >> shift & 15) as usize];
    }
    key
}
