//! Profiling aid: how long a store takes to reopen. `cargo run --release -p
//! repl-engine --example reopen_probe -- DIR [KEYS]` writes KEYS 256 B records (in
//! batches of 1,000), checkpoints, and times five reopens; `-- DIR KEYS again` only
//! reopens what an earlier run left in DIR.

use std::time::Instant;

use repl_engine::{Store, StoreOptions, WriteBatch};
use repl_wire::Collection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| std::env::temp_dir().join("repl-reopen-probe").display().to_string());
    let keys: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    // With `again`, the store DIR holds is reopened without writing (for a profiler).
    let again = args.get(3).is_some_and(|a| a == "again");
    if !again {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if !again {
        let store = Store::open_dir(&dir, StoreOptions::default()).expect("open");
        for chunk in (0..keys).step_by(1_000) {
            let mut b = WriteBatch::new();
            for i in chunk..(chunk + 1_000).min(keys) {
                b.put(Collection::Users, format!("user-{i:012}").as_bytes(), &[7u8; 256]);
            }
            store.write(b, repl_engine::Durability::Durable).expect("write");
        }
        store.checkpoint().expect("checkpoint");
    }
    for _ in 0..5 {
        let start = Instant::now();
        let store = Store::open_dir(&dir, StoreOptions::default()).expect("reopen");
        let took = start.elapsed();
        println!("reopen with {keys} keys: {:.1} ms", took.as_secs_f64() * 1e3);
        drop(store);
    }
}
