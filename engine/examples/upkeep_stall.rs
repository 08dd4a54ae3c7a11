//! Profiling aid: how long a checkpoint and a compaction of N keys take, and the
//! slowest durable put of a writer running meanwhile (what upkeep costs the writes).
//! `cargo run --release -p repl-engine --example upkeep_stall -- [KEYS]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use repl_engine::{Durability, Store, StoreOptions, WriteBatch};
use repl_wire::{Collection, StreamId};

fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let dir = std::env::temp_dir().join("repl-upkeep-stall");
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::open_dir(&dir, StoreOptions::default()).expect("open");
    for c in (0..n).step_by(10_000) {
        let mut b = WriteBatch::new();
        for i in c..(c + 10_000).min(n) {
            b.put(Collection::Users, format!("user-{i:010}").as_bytes(), &[7u8; 256]);
        }
        store.write(b, Durability::Durable).expect("w");
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut worst = Duration::ZERO;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                store.put(Collection::Users, format!("w-{i}").as_bytes(), b"x").expect("put");
                worst = worst.max(t.elapsed());
                i += 1;
            }
            (worst, i)
        });
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        store.checkpoint().expect("ckpt");
        println!("checkpoint of {n} keys: {:?}", t.elapsed());
        let v = store.vector(StreamId::Enterprise);
        let t = Instant::now();
        let r = store.compact(StreamId::Enterprise, &v).expect("compact");
        println!(
            "compact: {:?} ({} segments, {} entries kept)",
            t.elapsed(),
            r.segments_compacted,
            r.entries_kept
        );
        stop.store(true, Ordering::Relaxed);
        let (worst, puts) = writer.join().expect("writer");
        println!("a concurrent writer: {puts} durable puts, slowest {worst:?}");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
