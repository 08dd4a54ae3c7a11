//! Replication through the real node runtime: appliances on loopback QUIC (mutual TLS,
//! AES-256-GCM), real stores on real files, every write a durable commit.
//!
//! - `pair_replication`: a G4 database pair; from the first durable `put` on A until
//!   every record is durably applied on B, 256 B and 2 KiB records, one writer (one
//!   write at a time) and eight writers (each keeping up to 128 writes in flight). In
//!   the same group, the two ceilings: the same writes on a local store alone, and a
//!   bulk transfer of the same payload through the same QUIC transport with no storage.
//!   Then replication lag p50/p99 under a steady 10,000 writes/s, split into A's
//!   durable commit and the trip to B's durable apply, next to A's fdatasync p99.
//! - `catch_up`: B stops, A takes 1,000,000 writes, B starts again; until B holds them.
//! - `bootstrap`: a new, empty appliance joins by snapshot of 200,000 keys (A's log
//!   compacted).
//! - `mesh`: a G3 enterprise of 6 appliances over 2 sites; writes spread over all of
//!   them until every appliance holds every write; bytes and CPU per replica next to
//!   the pair's for the same writes.
//! - `audit_forwarding`: a G4 service appliance appends audit records until both
//!   database appliances hold them, next to the service appliance's local append rate.
//!
//! After each group the results are printed as records/s, MB/s of payload and ratios
//! to their ceilings. `cargo bench -p repl-benches --bench replication -- --test` runs
//! every part once on small data.
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput};
use repl_benches::cluster::{process_cpu_seconds, Cluster, G3_MESH, G4_PAIR, G4_PAIR_AND_SERVICE};
use repl_benches::{batch, link, quick, user, wanted, write_all, write_pipelined, BATCH, IN_FLIGHT};
use repl_engine::runtime::PairMode;
use repl_engine::topology::Generation;
use repl_engine::{AuditEvent, Store, StoreOptions, WriteBatch};
use repl_wire::{encode_frame, StreamId};

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Runs `once` for each of criterion's iterations, keeping every duration.
fn timed(runs: &mut Vec<Duration>, iters: u64, mut once: impl FnMut() -> Duration) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let d = once();
        runs.push(d);
        total += d;
    }
    total
}

/// A group whose every iteration is a long run: ten samples of one iteration each.
fn long_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    seconds: u64,
    throughput: Throughput,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { seconds }));
    g.throughput(throughput);
    g
}

/// Prints the median of `runs` of `records` records of `size` bytes each.
fn print_rate(what: &str, records: u64, size: usize, runs: &mut [Duration]) {
    let med = median(runs);
    println!(
        "{what}: median {:.2} s = {:.0} records/s, {:.1} MB/s of payload",
        med.as_secs_f64(),
        rate(records, med),
        rate(records * size as u64, med) / 1e6
    );
}

fn rate(count: u64, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64().max(1e-9)
}

fn replication(c: &mut Criterion) {
    if wanted("pair_replication") || wanted("lag") {
        let p = Cluster::start(Generation::G4, G4_PAIR, PairMode::Async);
        // Lag first, on a quiet disk: the pair bench ends by removing its local store's
        // files, and on this machine's disk (ext4 with online discard) removing a few
        // hundred MB stalls every fdatasync for up to ~130 ms.
        if wanted("lag") {
            lag(&p);
        }
        if wanted("pair_replication") {
            pair(c, &p);
        }
        p.shutdown();
    }
    if wanted("catch_up") {
        catch_up(c);
    }
    if wanted("bootstrap") {
        bootstrap(c);
    }
    if wanted("mesh") {
        mesh(c);
    }
    if wanted("audit_forwarding") {
        audit_forwarding(c);
    }
}

/// Time from the first put on A until B holds all `records`.
fn replicate(p: &Cluster, size: usize, writers: u64, records: u64, base: u64) -> Duration {
    let _guard = p.rt.enter();
    let start = Instant::now();
    let target = p.held(1, StreamId::Enterprise, 0) + records;
    let notify = || p.node(0).notify();
    write_all(p.node(0).store(), writers, records, base, &user(size), &notify);
    p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(120));
    start.elapsed()
}

fn pair(c: &mut Criterion, p: &Cluster) {
    let local_dir = tempfile::tempdir().expect("dir");
    let local = Store::open_dir(local_dir.path(), StoreOptions::default()).expect("local store");
    let mut quic = link();
    let records: u64 = if quick() { 512 } else { 20_000 };
    let mut results: BTreeMap<(usize, u64, &str), Vec<Duration>> = BTreeMap::new();
    let shared = Arc::new(Mutex::new(&mut results));
    let mut base = 0u64;
    let mut g = c.benchmark_group("pair_replication");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { 10 }));
    for size in [256usize, 2048] {
        g.throughput(Throughput::Bytes(records * size as u64));
        for writers in [1u64, 8] {
            g.bench_function(BenchmarkId::new(format!("replicated_{writers}_writers"), size), |b| {
                b.iter_custom(|iters| {
                    let mut guard = shared.lock().expect("lock");
                    timed(guard.entry((size, writers, "pair")).or_default(), iters, || {
                        base += records;
                        replicate(p, size, writers, records, base)
                    })
                })
            });
            g.bench_function(BenchmarkId::new(format!("local_store_{writers}_writers"), size), |b| {
                b.iter_custom(|iters| {
                    let mut guard = shared.lock().expect("lock");
                    timed(guard.entry((size, writers, "local")).or_default(), iters, || {
                        base += records;
                        let start = Instant::now();
                        write_all(&local, writers, records, base, &user(size), &|| {});
                        start.elapsed()
                    })
                })
            });
        }
        // The transport ceiling: the same payload in entry batches, no storage.
        let batches = records.div_ceil(BATCH as u64);
        let frames: Arc<Vec<Vec<u8>>> = Arc::new(
            (0..batches).map(|i| encode_frame(&batch(size, 1 + i * BATCH as u64)).expect("frame")).collect(),
        );
        g.bench_function(BenchmarkId::new("quic_ceiling", size), |b| {
            b.iter_custom(|iters| {
                let mut guard = shared.lock().expect("lock");
                timed(guard.entry((size, 0, "quic")).or_default(), iters, || {
                    let start = Instant::now();
                    let got = quic.transfer(&frames);
                    assert_eq!(got as u64, batches * BATCH as u64);
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
    drop(shared);

    println!("\npair replication ({records} records per run; medians of the runs above)");
    let mut med = |k: (usize, u64, &'static str)| {
        median(results.get_mut(&k).map(Vec::as_mut_slice).unwrap_or_default())
    };
    for size in [256usize, 2048] {
        let quic_rate = rate(records.div_ceil(BATCH as u64) * BATCH as u64, med((size, 0, "quic")));
        for writers in [1u64, 8] {
            let pair_rate = rate(records, med((size, writers, "pair")));
            let local_rate = rate(records, med((size, writers, "local")));
            println!(
                "  {size:>4} B x{writers}: {pair_rate:>9.0} records/s {:>7.1} MB/s | local store {local_rate:>9.0}/s (ratio {:.2}) | QUIC ceiling {quic_rate:>9.0}/s (ratio {:.3})",
                pair_rate * size as f64 / 1e6,
                pair_rate / local_rate,
                pair_rate / quic_rate,
            );
        }
    }
}

/// Replication lag under a steady write rate, open loop: a pacer submits a durable
/// put on A every 100 us without waiting for it; a waiter thread records when each
/// is durable on A (and wakes the node), a watcher when B holds it durably. Printed
/// as p50/p99 of the time to A's durable commit and of the time to B's durable
/// apply, both from the submit, next to A's fdatasync p99 over the same writes.
fn lag(p: &Cluster) {
    let _guard = p.rt.enter();
    let rate_per_s = 10_000u64;
    let records: u64 = if quick() { 1_000 } else { 20_000 };
    let before = p.sync_latency(0).counts();
    let first = p.held(1, StreamId::Enterprise, 0) + 1;
    let a = p.node(0).store();
    let mut sent = Vec::with_capacity(records as usize);
    let mut durable = Vec::with_capacity(records as usize);
    let mut seen = Vec::with_capacity(records as usize);
    let (mut cpu_before, mut cores) = (0.0, 0.0);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<repl_engine::PendingWrite>();
        let waiter = s.spawn(move || {
            let mut at = Vec::with_capacity(records as usize);
            // Wakes the node once per group of writes found durable together (a client
            // write through the runtime does the same), not once per write.
            while let Ok(first) = rx.recv() {
                let mut next = Some(first);
                while let Some(w) = next.take() {
                    w.wait().expect("durable on A");
                    at.push(Instant::now());
                    next = rx.try_recv().ok();
                }
                p.node(0).notify();
            }
            at
        });
        let watcher = s.spawn(move || {
            let mut at = Vec::with_capacity(records as usize);
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut next = first;
            while next < first + records && Instant::now() < deadline {
                let held = p.held(1, StreamId::Enterprise, 0);
                let now = Instant::now();
                while next <= held && next < first + records {
                    at.push(now);
                    next += 1;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            at
        });
        let make = user(256);
        let start = Instant::now();
        cpu_before = process_cpu_seconds();
        for i in 0..records {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate_per_s);
            // Sleeps rather than spins (a spinning pacer takes one of the two cores from
            // the appliances it measures); a late wake-up submits the overdue writes at
            // once, so the rate holds.
            if let Some(ahead) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(ahead);
            }
            sent.push(Instant::now());
            tx.send(a.submit(make(10_000_000 + i)).expect("submit")).expect("waiter runs");
        }
        drop(tx);
        durable = waiter.join().expect("waiter");
        seen = watcher.join().expect("watcher");
        cores = (process_cpu_seconds() - cpu_before) / start.elapsed().as_secs_f64();
    });
    let percentiles = |done: &[Instant]| {
        let mut lags: Vec<Duration> =
            sent.iter().zip(done).map(|(s, r)| r.saturating_duration_since(*s)).collect();
        lags.sort();
        let at =
            |q: f64| lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1))).copied();
        (at(0.50).unwrap_or_default().as_secs_f64() * 1e3, at(0.99).unwrap_or_default().as_secs_f64() * 1e3)
    };
    let after = p.sync_latency(0).counts();
    let deltas: Vec<u64> = after.iter().zip(before.iter()).map(|(a, b)| a - b).collect();
    let total: u64 = deltas.iter().sum();
    let mut cumulative = 0;
    let mut fsync_p99 = String::from("n/a");
    for (i, n) in deltas.iter().enumerate() {
        cumulative += n;
        if total > 0 && cumulative * 100 >= total * 99 {
            fsync_p99 = repl_engine::SYNC_LATENCY_BOUNDS_US
                .get(i)
                .map_or("> 250 ms".to_string(), |us| format!("<= {:.2} ms", *us as f64 / 1000.0));
            break;
        }
    }
    if std::env::var_os("LAG_DEBUG").is_some() {
        let start = sent[0];
        for (i, (s, d)) in sent.iter().zip(&durable).enumerate() {
            let l = d.saturating_duration_since(*s);
            if l > Duration::from_millis(5)
                && (i == 0
                    || durable[i - 1].saturating_duration_since(sent[i - 1]) <= Duration::from_millis(5))
            {
                println!("stall from write {i} at {:?}: {:?}", s.duration_since(start), l);
            }
        }
    }
    let (d50, d99) = percentiles(&durable);
    let (b50, b99) = percentiles(&seen);
    println!(
        "replication lag at {rate_per_s} writes/s open loop (256 B, {} of {records} seen on B): durable on A p50 {d50:.2} ms, p99 {d99:.2} ms; durable on B p50 {b50:.2} ms, p99 {b99:.2} ms; A's fdatasync p99 {fsync_p99} ({total} fdatasyncs); the process used {cores:.2} cores",
        seen.len(),
    );
}

/// Catch-up: B stops, A takes `records` durable writes (8 writers), B starts again;
/// timed from B's start until it holds them all. Every run starts from a new pair, so
/// the runs are alike: on one pair kept across runs, run k found B with k million
/// keys to reopen and A and B with k million more in memory, and the median measured
/// the growth as much as the catch-up.
fn catch_up(c: &mut Criterion) {
    let records: u64 = if quick() { 2_000 } else { 1_000_000 };
    let size = 256usize;
    let mut runs = Vec::new();
    let mut g = long_group(c, "catch_up", 60, Throughput::Bytes(records * size as u64));
    g.bench_function(BenchmarkId::new("after_downtime", size), |bench| {
        bench.iter_custom(|iters| {
            timed(&mut runs, iters, || {
                let mut p = Cluster::start(Generation::G4, G4_PAIR, PairMode::Async);
                p.stop(1);
                write_all(p.node(0).store(), 8, records, 0, &user(size), &|| {});
                let target =
                    p.node(0).store().vector(StreamId::Enterprise).get(p.node(0).store().incarnation());
                let start = Instant::now();
                p.restart(1);
                p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(600));
                let took = start.elapsed();
                p.shutdown();
                took
            })
        })
    });
    g.finish();
    print_rate(
        &format!("catch-up of {records} records of {size} B after downtime"),
        records,
        size,
        &mut runs,
    );
}

/// Bootstrap: A holds `records` keys and has compacted its log, so a new appliance
/// (an empty store) can only join by snapshot; timed from its start until it holds
/// A's vector.
fn bootstrap(c: &mut Criterion) {
    let records: u64 = if quick() { 5_000 } else { 200_000 };
    let size = 256usize;
    // No log kept beyond the active segment: the newcomer cannot be served from it.
    let options =
        StoreOptions { log_retained_bytes_max: 0, segment_bytes: 1 << 20, ..StoreOptions::default() };
    let mut p = Cluster::start_with(Generation::G4, G4_PAIR, PairMode::Async, options);
    p.stop(1);
    write_all(p.node(0).store(), 8, records, 0, &user(size), &|| {});
    let a = p.node(0).store();
    let report = a.compact(StreamId::Enterprise, &a.vector(StreamId::Enterprise)).expect("compact A");
    assert!(
        a.log_floors(StreamId::Enterprise).get(&a.incarnation()).copied().unwrap_or(1) > 1,
        "A's log still covers the first entries after {report:?}"
    );
    let target = p.node(0).store().vector(StreamId::Enterprise).get(p.node(0).store().incarnation());
    let mut runs = Vec::new();
    let mut g = long_group(c, "bootstrap", 60, Throughput::Bytes(records * size as u64));
    g.bench_function(BenchmarkId::new("by_snapshot", records), |bench| {
        bench.iter_custom(|iters| {
            timed(&mut runs, iters, || {
                p.stop(1);
                let start = Instant::now();
                p.restart_empty(1);
                p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(600));
                start.elapsed()
            })
        })
    });
    g.finish();
    print_rate(&format!("bootstrap by snapshot of {records} keys of {size} B"), records, size, &mut runs);
    p.shutdown();
}

/// Work of one enterprise for `records` writes spread over all its appliances.
struct Work {
    elapsed: Duration,
    /// Peer bytes sent plus received, summed over appliances.
    bytes: u64,
    /// Entries each appliance received from peers, summed over appliances.
    received: u64,
    /// Entries sent to peers, summed over appliances (more than `received`: resent),
    /// of them relayed, and retransmissions (restarts from an acknowledgement).
    sent: [u64; 3],
    cpu_s: f64,
}

/// Writes `records` 256 B records spread over every appliance of `e` (a pipelined
/// writer per appliance) and waits until every appliance holds every write.
fn spread(e: &Cluster, records: u64, base: u64) -> Work {
    let _guard = e.rt.enter();
    let n = e.len();
    let per = records / n as u64;
    let before: Vec<Vec<u64>> =
        (0..n).map(|i| (0..n).map(|o| e.held(i, StreamId::Enterprise, o)).collect()).collect();
    let bytes_before: u64 = (0..n).map(|i| e.peer_bytes(i)).map(|(o, i)| o + i).sum();
    let sent_total =
        || (0..n).map(|i| e.entries_sent(i)).fold([0; 3], |a, b| [a[0] + b[0], a[1] + b[1], a[2] + b[2]]);
    let sent_before = sent_total();
    let cpu_before = process_cpu_seconds();
    let start = Instant::now();
    std::thread::scope(|s| {
        for i in 0..n {
            s.spawn(move || {
                let notify = || e.node(i).notify();
                let first = base + i as u64 * per;
                write_pipelined(e.node(i).store(), 1, IN_FLIGHT, per, first, &user(256), &notify);
            });
        }
    });
    for i in 0..n {
        for (o, own) in before.iter().enumerate() {
            e.wait_held(i, StreamId::Enterprise, o, own[o] + per, Duration::from_secs(300));
        }
    }
    let elapsed = start.elapsed();
    let cpu_s = process_cpu_seconds() - cpu_before;
    // The last acknowledgements land in the byte counters with the acked vectors.
    e.wait_acknowledged(Duration::from_secs(30));
    let bytes = (0..n).map(|i| e.peer_bytes(i)).map(|(o, i)| o + i).sum::<u64>() - bytes_before;
    let received = (0..n)
        .map(|i| {
            (0..n).filter(|&o| o != i).map(|o| e.held(i, StreamId::Enterprise, o) - before[i][o]).sum::<u64>()
        })
        .sum();
    let sent_after = sent_total();
    let sent = [0, 1, 2].map(|k| sent_after[k] - sent_before[k]);
    Work { elapsed, bytes, received, sent, cpu_s }
}

/// The G3 mesh next to the G4 pair: `records` writes spread over all appliances.
fn mesh(c: &mut Criterion) {
    let records: u64 = if quick() { 3_000 } else { 100_000 };
    let mut results: BTreeMap<&str, Vec<Work>> = BTreeMap::new();
    let mut g = long_group(c, "mesh", 20, Throughput::Bytes(records * 256));
    for (name, generation, layout) in
        [("g3_6_appliances_2_sites", Generation::G3, G3_MESH), ("g4_pair", Generation::G4, G4_PAIR)]
    {
        let e = Cluster::start(generation, layout, PairMode::Async);
        let mut base = 0;
        let works = results.entry(name).or_default();
        g.bench_function(BenchmarkId::new(name, records), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let w = spread(&e, records, base);
                    base += records;
                    total += w.elapsed;
                    works.push(w);
                }
                total
            })
        });
        e.shutdown();
    }
    g.finish();
    println!("\nwrites spread over every appliance until all hold all ({records} x 256 B; medians)");
    let mut per_entry = BTreeMap::new();
    for (name, works) in &mut results {
        works.sort_by_key(|w| w.elapsed);
        let Some(w) = works.get(works.len() / 2) else { continue };
        let replicas = if *name == "g4_pair" { 2.0 } else { 6.0 };
        let bytes_per_entry = w.bytes as f64 / w.received.max(1) as f64;
        let cpu_us_per_entry = w.cpu_s * 1e6 / w.received.max(1) as f64;
        per_entry.insert(*name, (bytes_per_entry, cpu_us_per_entry));
        println!(
            "  {name}: {:.2} s ({:.0} writes/s); per replica {:.1} MB on the wire, {:.2} CPU s; per entry received {bytes_per_entry:.0} B on the wire (sent and received), {cpu_us_per_entry:.1} CPU us; {:.2} entries sent per entry received ({} relayed, {} retransmissions)",
            w.elapsed.as_secs_f64(),
            rate(records, w.elapsed),
            w.bytes as f64 / replicas / 1e6,
            w.cpu_s / replicas,
            w.sent[0] as f64 / w.received.max(1) as f64,
            w.sent[1],
            w.sent[2],
        );
    }
    if let (Some(m), Some(p)) = (per_entry.get("g3_6_appliances_2_sites"), per_entry.get("g4_pair")) {
        println!(
            "  mesh / pair, per entry each replica receives: {:.2}x bytes, {:.2}x CPU (1.0: every write crosses the network once per replica, no flooding)",
            m.0 / p.0,
            m.1 / p.1
        );
    }
}

/// An audit event of about 256 bytes.
fn audit(i: u64) -> WriteBatch {
    let mut b = WriteBatch::new();
    b.audit(AuditEvent {
        time_ms: 1_700_000_000_000 + i,
        user: format!("user-{:06}", i % 100_000),
        appliance: "svc1".into(),
        action: "login".into(),
        detail: format!("{:0>200}", i),
    });
    b
}

/// Audit forwarding: the service appliance appends audit records (8 pipelined
/// writers) until both database appliances hold them durably.
fn audit_forwarding(c: &mut Criterion) {
    let records: u64 = if quick() { 2_000 } else { 100_000 };
    let e = Cluster::start(Generation::G4, G4_PAIR_AND_SERVICE, PairMode::Async);
    let local_dir = tempfile::tempdir().expect("dir");
    let local = Store::open_dir(local_dir.path(), StoreOptions::default()).expect("local store");
    let (mut forwarded, mut alone) = (Vec::new(), Vec::new());
    let mut base = 0;
    let mut g = long_group(c, "audit_forwarding", 20, Throughput::Elements(records));
    g.bench_function(BenchmarkId::new("service_to_both_databases", records), |b| {
        b.iter_custom(|iters| {
            timed(&mut forwarded, iters, || {
                let _guard = e.rt.enter();
                let start = Instant::now();
                let target = e.held(2, StreamId::Audit, 2) + records;
                let notify = || e.node(2).notify();
                write_all(e.node(2).store(), 8, records, base, &audit, &notify);
                base += records;
                for db in [0, 1] {
                    e.wait_held(db, StreamId::Audit, 2, target, Duration::from_secs(300));
                }
                start.elapsed()
            })
        })
    });
    g.bench_function(BenchmarkId::new("local_append_alone", records), |b| {
        b.iter_custom(|iters| {
            timed(&mut alone, iters, || {
                let start = Instant::now();
                write_all(&local, 8, records, base, &audit, &|| {});
                base += records;
                start.elapsed()
            })
        })
    });
    g.finish();
    let (f, l) = (median(&mut forwarded), median(&mut alone));
    println!(
        "audit forwarding of {records} records: {:.0} records/s on both database appliances, local append alone {:.0}/s (ratio {:.2})",
        rate(records, f),
        rate(records, l),
        rate(records, f) / rate(records, l)
    );
    e.shutdown();
}

criterion_group!(benches, replication);
criterion_main!(benches);
