//! Recovery on hostile files: a store whose enterprise log segment is arbitrary bytes
//! (after a valid identity file) opens or fails with a typed error, never a panic; a
//! store that opens serves reads and accepts a write.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use repl_engine::{SimConfig, SimStorage, Storage, Store, StoreOptions};
use repl_wire::Collection;

fuzz_target!(|data: &[u8]| {
    let disk = SimStorage::new(SimConfig::default());
    // Create a real store (identity and segment names), then overwrite its segment.
    {
        let store = Store::open(Arc::new(disk.clone()), StoreOptions { segment_bytes: 64 * 1024, ..StoreOptions::default() })
            .expect("fresh store");
        store.put(Collection::Users, b"seed", b"value").expect("put");
    }
    let name = disk.list().expect("list").into_iter().find(|n| n.starts_with("enterprise-") && n.ends_with(".log"));
    let Some(name) = name else { return };
    let file = disk.open(&name).expect("open segment");
    // The first byte chooses whether the header is kept (to reach the frame parser)
    // or overwritten too (to reach the header checks).
    let Some((&mode, body)) = data.split_first() else { return };
    let offset = if mode & 1 == 0 { 64 } else { 0 };
    let _ = file.write_all_at(body, offset);
    let _ = file.sync_data();
    if let Ok(store) = Store::open(Arc::new(disk.clone()), StoreOptions { segment_bytes: 64 * 1024, ..StoreOptions::default() }) {
        let _ = store.get(Collection::Users, b"seed");
        let _ = store.put(Collection::Users, b"after", b"x");
    }
});
