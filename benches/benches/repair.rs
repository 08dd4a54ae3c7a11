//! Anti-entropy and bootstrap between two stores on real files, driven through the
//! real sync machines with every message encoded as it would cross the wire.
//!
//! Set-up: store A holds N keys (256-byte values) and has compacted its log, so a new
//! store B can only join by snapshot (the bootstrap: its bytes are the full transfer).
//! Then, per divergence D, A changes D keys while B is away and compacts again; B
//! reconnects, gets `NotCovered`, and repairs by comparing hash trees. Printed: the
//! bytes and messages of each repair next to the full transfer, as N and D grow.
//! Timed by criterion: one repair of 100 differing keys, and the bootstrap rate.
//!
//! `REPAIR_KEYS=1000000 cargo bench -p repl-benches --bench repair` measures at 1M keys
//! (the default is 100,000; `--test` uses 10,000).

#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use repl_benches::{key, quick, value_256};
use repl_engine::sync::{PeerSync, SyncConfig, SyncSetup};
use repl_engine::topology::Scope;
use repl_engine::{Store, StoreOptions, WriteBatch};
use repl_wire::{encode_frame, Collection, NodeId, PeerMessage, StreamId, VersionVector};

/// What crossed the wire during an exchange.
#[derive(Debug, Default, Clone, Copy)]
struct Wire {
    messages: u64,
    bytes: u64,
}

const SEGMENT_BYTES: u64 = 1024 * 1024;

fn options() -> StoreOptions {
    // Keep no log beyond the active segment: a peer that was away always repairs.
    StoreOptions { log_retained_bytes_max: 0, segment_bytes: SEGMENT_BYTES, ..StoreOptions::default() }
}

fn machine(me: &str, peer: &str, session: u64, store: &Store) -> PeerSync {
    let streams = [StreamId::Enterprise].into_iter().collect::<std::collections::BTreeSet<_>>();
    let setup = SyncSetup {
        me: NodeId::new(me).expect("id"),
        peer: NodeId::new(peer).expect("id"),
        scope: Scope { send: streams.clone(), receive: streams },
        epoch: 1,
        session,
        peer_incarnation: None,
        config: SyncConfig::default(),
    };
    PeerSync::new(setup, 0, store)
}

/// Runs a session between A and B until both are quiet; counts every message's
/// encoded frame except the two handshakes.
fn session(sa: &Store, sb: &Store, session: u64) -> Wire {
    let mut a = machine("a", "b", session, sa);
    let mut b = machine("b", "a", session + 1, sb);
    let mut wire = Wire::default();
    let mut now = 0;
    let count = |m: &PeerMessage, wire: &mut Wire| {
        if !matches!(m, PeerMessage::Hello(_)) {
            wire.messages += 1;
            wire.bytes += encode_frame(m).map_or(0, |f| f.len() as u64);
        }
    };
    for _ in 0..1_000_000 {
        let mut moved = false;
        while let Some(m) = a.poll_transmit() {
            count(&m, &mut wire);
            b.handle_message(now, m, sb);
            moved = true;
        }
        while let Some(m) = b.poll_transmit() {
            count(&m, &mut wire);
            a.handle_message(now, m, sa);
            moved = true;
        }
        if !moved {
            let next = [a.poll_timeout(sa), b.poll_timeout(sb)].into_iter().flatten().min();
            let Some(t) = next else { return wire };
            now = now.max(t);
            a.handle_timeout(now, sa);
            b.handle_timeout(now, sb);
        }
    }
    panic!("the pair never went quiet");
}

fn populate(store: &Store, n: u64, salt: u64) {
    for start in (0..n).step_by(1_000) {
        let mut batch = WriteBatch::new();
        for i in start..(start + 1_000).min(n) {
            batch.put(Collection::Users, &key(i), &value_256(i ^ salt));
        }
        store.write(batch, repl_engine::Durability::Durable).expect("populate");
    }
}

fn compact(store: &Store) {
    store.flush().expect("flush");
    store.compact(StreamId::Enterprise, &VersionVector::new()).expect("compact");
}

/// Changes `d` keys spread over the key space, rewriting them until the log rolls
/// past two segments, then compacts: the peer that was away is below the log floor,
/// and the keys that differ are still exactly `d`.
fn diverge(store: &Store, n: u64, d: u64, salt: u64) {
    let rounds = (2 * SEGMENT_BYTES).div_ceil(d * 300);
    for round in 0..rounds {
        let mut batch = WriteBatch::new();
        for j in 0..d {
            let i = (j * (n / d.max(1))) % n;
            batch.put(Collection::Users, &key(i), &value_256(i ^ salt ^ (round << 40)));
        }
        store.write(batch, repl_engine::Durability::Durable).expect("diverge");
    }
    compact(store);
}

fn equal(a: &Store, b: &Store) -> bool {
    a.digest(StreamId::Enterprise).expect("digest") == b.digest(StreamId::Enterprise).expect("digest")
}

fn repair(c: &mut Criterion) {
    let n: u64 = if quick() {
        10_000
    } else {
        std::env::var("REPAIR_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000)
    };
    let (da, db) = (tempfile::tempdir().expect("tempdir"), tempfile::tempdir().expect("tempdir"));
    let sa = Store::open_dir(da.path(), options()).expect("open A");
    let sb = Store::open_dir(db.path(), options()).expect("open B");
    populate(&sa, n, 0);
    compact(&sa);

    let started = Instant::now();
    let full = session(&sa, &sb, 10);
    let took = started.elapsed();
    assert!(equal(&sa, &sb), "bootstrap must converge");
    println!(
        "bootstrap of {n} keys: {} bytes in {} messages, {:.1} s, {:.1} MB/s on the wire",
        full.bytes,
        full.messages,
        took.as_secs_f64(),
        full.bytes as f64 / 1e6 / took.as_secs_f64()
    );

    let mut session_id = 100;
    for d in [1u64, 10, 100, 1_000] {
        if d > n / 10 {
            break;
        }
        diverge(&sa, n, d, d + 1);
        session_id += 2;
        let started = Instant::now();
        let w = session(&sa, &sb, session_id);
        let took = started.elapsed();
        assert!(equal(&sa, &sb), "repair must converge");
        println!(
            "repair of {d} differing keys out of {n}: {} bytes in {} messages ({:.3}% of the full transfer), {:.0} ms",
            w.bytes,
            w.messages,
            100.0 * w.bytes as f64 / full.bytes as f64,
            took.as_secs_f64() * 1e3
        );
        if d == 100 {
            assert!(
                w.bytes * 100 < full.bytes || n < 100_000,
                "repairing 100 keys of {n} cost {} bytes, not under 1% of {}",
                w.bytes,
                full.bytes
            );
        }
    }

    let mut group = c.benchmark_group("repair");
    group.sample_size(10).measurement_time(Duration::from_secs(if quick() { 1 } else { 20 }));
    let mut salt = 1_000;
    group.bench_function(format!("100 differing keys of {n}"), |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                salt += 1;
                diverge(&sa, n, 100, salt);
                session_id += 2;
                let started = Instant::now();
                session(&sa, &sb, session_id);
                total += started.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, repair);
criterion_main!(benches);
