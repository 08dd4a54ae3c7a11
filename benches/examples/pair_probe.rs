//! Profiling aid for pair replication, quicker than the criterion bench: a G4 pair,
//! eight writers on A each keeping 128 durable puts in flight (as the bench's
//! `replicated_8_writers`), timed until B holds every write; then the same writes
//! on a store of its own in the same process (the bench's local-store ceiling).
//! Prints records/s, CPU per record, and the entries per message A sent.
//! `cargo run --release -p repl-benches --example pair_probe -- [SIZE] [RECORDS] [RUNS]`

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use repl_benches::cluster::{process_cpu_seconds, Cluster, G4_PAIR};
use repl_benches::key;
use repl_engine::runtime::PairMode;
use repl_engine::topology::Generation;
use repl_engine::{Store, StoreOptions, WriteBatch};
use repl_wire::{Collection, StreamId};

const WRITERS: u64 = 8;
const IN_FLIGHT: usize = 128;

/// Writes `records` records of `size` bytes from [`WRITERS`] threads; `after` runs
/// after each write is durable.
fn write(store: &Store, size: usize, records: u64, base: u64, after: &(dyn Fn() + Sync)) {
    std::thread::scope(|s| {
        for w in 0..WRITERS {
            s.spawn(move || {
                let value = vec![7u8; size];
                let mut pending = VecDeque::with_capacity(IN_FLIGHT);
                let mut i = w;
                while i < records {
                    let mut b = WriteBatch::new();
                    b.put(Collection::Users, &key(base + i), &value);
                    pending.push_back(store.submit(b).expect("submit"));
                    if pending.len() == IN_FLIGHT {
                        pending.pop_front().expect("non-empty").wait().expect("durable");
                        after();
                    }
                    i += WRITERS;
                }
                for p in pending {
                    p.wait().expect("durable");
                    after();
                }
            });
        }
    });
}

fn report(what: &str, records: u64, size: usize, secs: f64, cpu: f64) {
    println!(
        "{what}: {records} x {size} B in {secs:.2} s = {:.0} records/s, {:.1} MB/s, {:.1} us CPU per record",
        records as f64 / secs,
        records as f64 * size as f64 / secs / 1e6,
        cpu / records as f64 * 1e6
    );
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let size = args.first().copied().unwrap_or(2048) as usize;
    let records = args.get(1).copied().unwrap_or(100_000);
    let runs = args.get(2).copied().unwrap_or(2);
    let p = Cluster::start(Generation::G4, G4_PAIR, PairMode::Async);
    let local_dir = tempfile::tempdir().expect("dir");
    let local = Store::open_dir(local_dir.path(), StoreOptions::default()).expect("local store");
    let mut base = 0;
    for _ in 0..runs {
        let _guard = p.rt.enter();
        let target = p.held(1, StreamId::Enterprise, 0) + records;
        let sent_before = p.entries_sent(0)[0];
        let messages_before: u64 = p.node(0).status().peers.iter().map(|s| s.sessions).sum();
        let (cpu, start) = (process_cpu_seconds(), Instant::now());
        let notify = || p.node(0).notify();
        write(p.node(0).store(), size, records, base, &notify);
        let written = start.elapsed().as_secs_f64();
        p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(300));
        let (secs, cpu) = (start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        report("pair", records, size, secs, cpu);
        let sent = p.entries_sent(0)[0] - sent_before;
        let sessions: u64 = p.node(0).status().peers.iter().map(|s| s.sessions).sum();
        println!(
            "  durable on A after {written:.2} s; A sent {sent} entries ({} sessions started meanwhile)",
            sessions - messages_before
        );
        base += records;
        let (cpu, start) = (process_cpu_seconds(), Instant::now());
        write(&local, size, records, base, &|| {});
        report("local store", records, size, start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        base += records;
    }
    p.shutdown();
}
