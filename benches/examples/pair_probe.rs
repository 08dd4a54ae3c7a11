//! Profiling aid for pair replication, quicker than the criterion bench: a G4 pair,
//! the bench's writers on A (`write_all`: eight, each keeping 128 durable puts in
//! flight), timed until B holds every write; then the same writes
//! on a store of its own in the same process (the bench's local-store ceiling).
//! Prints records/s and CPU per record, and how many entries A sent (more than
//! written: a resend) and sessions it started (a reconnect).
//! `cargo run --release -p repl-benches --example pair_probe -- [SIZE] [RECORDS] [RUNS]`

use std::time::{Duration, Instant};

use repl_benches::cluster::{process_cpu_seconds, Cluster, G4_PAIR};
use repl_benches::{user, write_all};
use repl_engine::runtime::PairMode;
use repl_engine::topology::Generation;
use repl_engine::{Store, StoreOptions};
use repl_wire::StreamId;

const WRITERS: u64 = 8;

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
        let sessions_before: u64 = p.node(0).status().peers.iter().map(|s| s.sessions).sum();
        let (cpu, start) = (process_cpu_seconds(), Instant::now());
        let notify = || p.node(0).notify();
        write_all(p.node(0).store(), WRITERS, records, base, &user(size), &notify);
        let written = start.elapsed().as_secs_f64();
        p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(300));
        let (secs, cpu) = (start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        report("pair", records, size, secs, cpu);
        let sent = p.entries_sent(0)[0] - sent_before;
        let sessions: u64 = p.node(0).status().peers.iter().map(|s| s.sessions).sum();
        println!(
            "  durable on A after {written:.2} s; A sent {sent} entries ({} sessions started meanwhile)",
            sessions - sessions_before
        );
        base += records;
        let (cpu, start) = (process_cpu_seconds(), Instant::now());
        write_all(&local, WRITERS, records, base, &user(size), &|| {});
        report("local store", records, size, start.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        base += records;
    }
    p.shutdown();
}
