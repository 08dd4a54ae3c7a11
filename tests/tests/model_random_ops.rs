//! Model-based test: random sequences of put, delete, get, scan, compaction,
//! checkpoints, injected fsync failures and power cuts against a `BTreeMap` model.
//! Every acknowledged write must be readable exactly as the model says, across crashes.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use repl_engine::{Error, ManualClock, SimConfig, SimStorage, Store};
use repl_tests::options;
use repl_wire::{Collection, StreamId};

#[derive(Debug, Clone)]
enum Op {
    Put(u8, u16),
    Delete(u8),
    Get(u8),
    Scan,
    Compact,
    Checkpoint,
    Crash,
    FailNextSync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u8..24, 0u16..1500).prop_map(|(k, n)| Op::Put(k, n)),
        2 => (0u8..24).prop_map(Op::Delete),
        3 => (0u8..24).prop_map(Op::Get),
        1 => Just(Op::Scan),
        1 => Just(Op::Compact),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Crash),
        1 => Just(Op::FailNextSync),
    ]
}

fn key(k: u8) -> Vec<u8> {
    format!("key{k:02}").into_bytes()
}

fn value(k: u8, n: u16) -> Vec<u8> {
    let mut v = format!("{k}:{n}:").into_bytes();
    v.resize(8 + n as usize % 700, k);
    v
}

fn run(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let clock = Arc::new(ManualClock::new(5_000));
    let mut disk = SimStorage::new(SimConfig { seed, ..SimConfig::default() });
    let open = |d: &SimStorage| Store::open(Arc::new(d.clone()), options(&clock, 8 * 1024)).expect("open");
    let mut store = open(&disk);
    let mut model: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
    // Keys whose last write failed: after the restart either outcome is allowed.
    let mut uncertain: BTreeMap<u8, Option<Vec<u8>>> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Put(k, n) => match store.put(Collection::Users, &key(k), &value(k, n)) {
                Ok(_) => {
                    model.insert(k, value(k, n));
                }
                // Refused by a poisoned store: certainly not applied.
                Err(Error::Poisoned) => {}
                Err(_) => {
                    uncertain.insert(k, Some(value(k, n)));
                }
            },
            Op::Delete(k) => match store.delete(Collection::Users, &key(k)) {
                Ok(_) => {
                    model.remove(&k);
                }
                Err(Error::Poisoned) => {}
                Err(_) => {
                    uncertain.insert(k, None);
                }
            },
            Op::Get(k) if !uncertain.contains_key(&k) => {
                let got = store.get(Collection::Users, &key(k)).expect("read").value().map(|v| v.to_vec());
                prop_assert_eq!(got, model.get(&k).cloned(), "get key{:02}", k);
            }
            Op::Get(_) => {}
            Op::Scan if uncertain.is_empty() => {
                let keys = store.scan_keys(Collection::Users, b"", 100);
                let want: Vec<Vec<u8>> = model.keys().map(|k| key(*k)).collect();
                prop_assert_eq!(keys, want);
            }
            Op::Scan => {}
            Op::Compact => {
                let _ = store.compact(StreamId::Enterprise, &store.vector(StreamId::Enterprise));
            }
            Op::Checkpoint => {
                let _ = store.checkpoint();
            }
            Op::FailNextSync => disk.set_fail_syncs_from(Some(disk.syncs())),
            Op::Crash => {
                drop(store);
                disk = disk.crash();
                store = open(&disk);
                for (k, maybe) in std::mem::take(&mut uncertain) {
                    let got =
                        store.get(Collection::Users, &key(k)).expect("read").value().map(|v| v.to_vec());
                    let before = model.get(&k).cloned();
                    prop_assert!(got == before || got == maybe, "key{:02}: got {:?}", k, got);
                    match got {
                        Some(v) => model.insert(k, v),
                        None => model.remove(&k),
                    };
                }
                for (k, v) in &model {
                    let got = store.get(Collection::Users, &key(*k)).expect("read");
                    prop_assert_eq!(got.value(), Some(&v[..]), "after crash key{:02}", k);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_a_btreemap_model(ops in proptest::collection::vec(op(), 1..120), seed in any::<u64>()) {
        run(ops, seed)?;
    }
}
