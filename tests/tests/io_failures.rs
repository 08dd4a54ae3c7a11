//! I/O failures on the simulated disk: a failed fsync poisons the store (nothing in
//! the failed commit is acknowledged, nothing later is accepted), and a full disk
//! refuses writes with a typed error, poisons nothing, and resumes once space is freed.

use std::sync::Arc;

use repl_engine::{Error, ManualClock, SimConfig, SimStorage, Store};
use repl_tests::options;
use repl_wire::{Collection, StreamId};

#[test]
fn fsync_error_poisons_the_store() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let store = Store::open(Arc::new(disk.clone()), options(&clock, 16 * 1024)).expect("open");
    for i in 0..20u32 {
        store.put(Collection::Users, format!("k{i}").as_bytes(), b"ok").expect("put");
    }
    disk.set_fail_syncs_from(Some(disk.syncs()));
    let failed = store.put(Collection::Users, b"doomed", b"x");
    assert!(matches!(failed, Err(Error::Io { .. })), "the failing commit is not acknowledged: {failed:?}");
    assert!(store.is_poisoned());
    // The disk works again, but the store never retries the fsync or accepts writes.
    disk.set_fail_syncs_from(None);
    assert!(matches!(store.put(Collection::Users, b"later", b"x"), Err(Error::Poisoned)));
    assert!(matches!(store.checkpoint(), Err(Error::Poisoned)));
    assert!(matches!(
        store.compact(StreamId::Enterprise, &store.vector(StreamId::Enterprise)),
        Err(Error::Poisoned)
    ));
    drop(store);
    // After a restart every acknowledged write is there.
    let after = disk.crash();
    let store = Store::open(Arc::new(after), options(&clock, 16 * 1024)).expect("reopen");
    for i in 0..20u32 {
        assert_eq!(
            store.get(Collection::Users, format!("k{i}").as_bytes()).expect("read").value(),
            Some(&b"ok"[..])
        );
    }
    assert!(store.get(Collection::Users, b"later").expect("read").values.is_empty());
}

#[test]
fn full_disk_refuses_writes_without_poisoning_and_resumes() {
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let store = Store::open(Arc::new(disk.clone()), options(&clock, 16 * 1024)).expect("open");
    store.put(Collection::Users, b"first", b"1").expect("put");
    disk.set_capacity(Some(64 * 1024));
    let mut acked = 0u32;
    let err = loop {
        match store.put(Collection::Users, format!("k{acked}").as_bytes(), &[5u8; 512]) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the disk never filled");
    };
    assert!(matches!(err, Error::StorageFull { stream: StreamId::Enterprise }), "typed error: {err:?}");
    assert!(!store.is_poisoned());
    assert!(matches!(store.put(Collection::Users, b"more", &[5u8; 512]), Err(Error::StorageFull { .. })));
    // Reads still work and nothing stored was touched.
    assert_eq!(store.get(Collection::Users, b"first").expect("read").value(), Some(&b"1"[..]));
    disk.set_capacity(None);
    store.put(Collection::Users, b"after", b"space freed").expect("writes resume");
    drop(store);
    let store = Store::open(Arc::new(disk.crash()), options(&clock, 16 * 1024)).expect("reopen");
    for i in 0..acked {
        assert_eq!(
            store.get(Collection::Users, format!("k{i}").as_bytes()).expect("read").value(),
            Some(&[5u8; 512][..])
        );
    }
    assert_eq!(store.get(Collection::Users, b"after").expect("read").value(), Some(&b"space freed"[..]));
    assert!(store.get(Collection::Users, b"more").expect("read").values.is_empty());
}

#[test]
fn full_disk_inside_a_segment_refuses_writes_and_resumes() {
    // A segment is allocated 4 MiB at a time: the disk fills at one of those steps,
    // inside the one segment, not only when a segment is made.
    use repl_engine::Storage;
    let disk = SimStorage::new(SimConfig::default());
    let clock = Arc::new(ManualClock::new(1_000));
    let segment = 16 * 1024 * 1024;
    let store = Store::open(Arc::new(disk.clone()), options(&clock, segment)).expect("open");
    store.put(Collection::Users, b"first", b"1").expect("put");
    disk.set_capacity(Some(6 * 1024 * 1024));
    let value = [6u8; 4096];
    let mut acked = 0u32;
    let err = loop {
        match store.put(Collection::Users, format!("k{acked}").as_bytes(), &value) {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the disk never filled");
    };
    assert!(matches!(err, Error::StorageFull { stream: StreamId::Enterprise }), "typed error: {err:?}");
    assert!(!store.is_poisoned());
    let logs =
        |disk: &SimStorage| disk.list().expect("list").into_iter().filter(|n| n.ends_with(".log")).count();
    assert_eq!(logs(&disk), 1, "the disk filled inside the first segment");
    // The first step (4 MiB) took about 1,000 of these writes; the next step would
    // pass the 6 MiB disk. A segment allocated whole at creation would have taken
    // all 16 MiB (about 4,000 writes) before refusing anything.
    assert!((500..2_000).contains(&acked), "the disk filled at the second step: {acked} writes");
    assert_eq!(store.get(Collection::Users, b"first").expect("read").value(), Some(&b"1"[..]));
    disk.set_capacity(None);
    store.put(Collection::Users, b"after", b"space freed").expect("writes resume");
    drop(store);
    let store = Store::open(Arc::new(disk.crash()), options(&clock, segment)).expect("reopen");
    for i in 0..acked {
        let read = store.get(Collection::Users, format!("k{i}").as_bytes()).expect("read");
        assert_eq!(read.value(), Some(&value[..]), "acknowledged write k{i}");
    }
    assert_eq!(store.get(Collection::Users, b"after").expect("read").value(), Some(&b"space freed"[..]));
}
