//! Pair replication through the real node runtime: two database appliances of a G4
//! enterprise on loopback QUIC (mutual TLS, AES-256-GCM), real stores on real files.
//! Timed: from the first durable `put` on A until every record is durably applied on
//! B, for 256 B and 2 KiB records and one and eight writers. In the same run, the two
//! ceilings: the same writes on a local store alone (no replication), and a bulk
//! transfer of the same payload through the same QUIC transport with no storage.
//! Printed after the group: each result as records/s, MB/s of payload, and its ratio
//! to both ceilings; then replication lag p50/p99 under a steady 10,000 writes/s,
//! next to A's fdatasync p99.
#![allow(missing_docs)] // criterion_group! and criterion_main! generate undocumented public items

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use repl_benches::{batch, key, link, quick, BATCH};
use repl_engine::runtime::{Node, NodeConfig};
use repl_engine::topology::{Appliance, ExternalServers, Generation, Role, Site, SiteKind, Topology};
use repl_engine::{Durability, FileStorage, Store, StoreOptions, WriteBatch};
use repl_wire::transport::{AllowedPeers, CertificateAuthority, Identity, TlsSetup, Validity};
use repl_wire::{encode_frame, Collection, NodeId, StreamId};

struct Pair {
    rt: tokio::runtime::Runtime,
    a: Node,
    /// B, while it runs (the catch-up bench stops and restarts it).
    b: Option<Node>,
    b_config: NodeConfig,
    a_latency: Arc<repl_engine::SyncLatency>,
    dirs: [tempfile::TempDir; 2],
}

impl Pair {
    fn b(&self) -> &Node {
        self.b.as_ref().expect("B runs")
    }

    /// Stops B (a clean stop; what it holds is durable).
    fn stop_b(&mut self) {
        if let Some(b) = self.b.take() {
            self.rt.block_on(b.shutdown(Duration::ZERO));
        }
    }

    /// Starts B again on its data and address.
    fn start_b(&mut self) {
        let store = Store::open_dir(self.dirs[1].path(), StoreOptions::default()).expect("reopen B");
        self.b = Some(self.rt.block_on(Node::start(store, self.b_config.clone())).expect("restart B"));
    }
}

fn free_port() -> std::net::SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free port")
}

fn pair() -> Pair {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let ca = CertificateAuthority::create("bench", Validity::days_from_now(2)).expect("ca");
    // B (the one the catch-up bench restarts) has the smaller id: it dials at once when it starts.
    let ids = ["db2", "db1"].map(|i| NodeId::new(i).expect("id"));
    let site = |id: &str, range: &str| Site {
        id: id.into(),
        name: id.into(),
        kind: SiteKind::Active,
        ranges: vec![range.parse().expect("range")],
        primary_failover: None,
        secondary_failover: None,
        external: None,
    };
    let topology = Topology {
        enterprise: "bench".into(),
        generation: Generation::G4,
        epoch: 1,
        external: ExternalServers::default(),
        bootstrap: None,
        sites: vec![site("a", "10.1.0.0/16"), site("b", "10.2.0.0/16")],
        appliances: ids
            .iter()
            .zip(["a", "b"])
            .map(|(id, s)| Appliance {
                id: id.clone(),
                name: id.to_string(),
                site: s.into(),
                address: free_port(),
                roles: [Role::Database].into_iter().collect(),
            })
            .collect(),
    };
    let dirs = [tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir")];
    let mut nodes = Vec::new();
    let mut configs = Vec::new();
    let mut latency = None;
    for (i, id) in ids.iter().enumerate() {
        let cert = ca.issue(&Identity::Appliance(id.clone()), Validity::days_from_now(1)).expect("cert");
        let allowed = AllowedPeers::new(ids.clone());
        let tls =
            TlsSetup::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem, &[], allowed).expect("tls");
        let storage = FileStorage::new(dirs[i].path()).expect("storage");
        if i == 0 {
            latency = Some(storage.sync_latency());
        }
        let store = Store::open(Arc::new(storage), StoreOptions::default()).expect("store");
        let config = NodeConfig::new(id.clone(), topology.clone(), tls, topology.appliances[i].address);
        configs.push(config.clone());
        nodes.push(rt.block_on(Node::start(store, config)).expect("node"));
    }
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.status().connected.is_empty() || b.status().connected.is_empty() {
        assert!(Instant::now() < deadline, "the pair did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    let b_config = configs.pop().expect("B's config");
    Pair { rt, a, b: Some(b), b_config, a_latency: latency.expect("latency"), dirs }
}

/// A's entries B holds durably.
fn held_on_b(p: &Pair) -> u64 {
    p.b().store().vector(StreamId::Enterprise).get(p.a.store().incarnation())
}

/// `writers` threads write `records` durable puts of `size` bytes to `store` in total,
/// calling `after_write` after each (the node's notify when replicating).
fn write_all(
    store: &Store,
    size: usize,
    writers: u64,
    records: u64,
    base: u64,
    after_write: &(dyn Fn() + Sync),
) {
    std::thread::scope(|s| {
        for w in 0..writers {
            s.spawn(move || {
                let value = vec![(w as u8).wrapping_mul(31); size];
                let mut i = w;
                while i < records {
                    let mut batch = WriteBatch::new();
                    batch.put(Collection::Users, &key(base + i), &value);
                    store.write(batch, Durability::Durable).expect("durable put");
                    after_write();
                    i += writers;
                }
            });
        }
    });
}

/// Time from the first put on A until B holds all `records`.
fn replicate(p: &Pair, size: usize, writers: u64, records: u64, base: u64) -> Duration {
    let _guard = p.rt.enter();
    let start = Instant::now();
    let target = held_on_b(p) + records;
    let notify = || p.a.notify();
    write_all(p.a.store(), size, writers, records, base, &notify);
    let deadline = Instant::now() + Duration::from_secs(120);
    while held_on_b(p) < target {
        assert!(Instant::now() < deadline, "B did not receive every record");
        std::thread::sleep(Duration::from_micros(200));
    }
    start.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn replication(c: &mut Criterion) {
    let p = pair();
    let local_dir = tempfile::tempdir().expect("dir");
    let local = Store::open_dir(local_dir.path(), StoreOptions::default()).expect("local store");
    let mut quic = link();
    let records: u64 = if quick() { 512 } else { 20_000 };
    let mut results: BTreeMap<(usize, u64, &str), Vec<Duration>> = BTreeMap::new();
    let results_ref = Arc::new(Mutex::new(&mut results));
    let mut base = 0u64;
    let mut g = c.benchmark_group("pair_replication");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { 10 }));
    for size in [256usize, 2048] {
        g.throughput(Throughput::Bytes(records * size as u64));
        for writers in [1u64, 8] {
            g.bench_function(BenchmarkId::new(format!("replicated_{writers}_writers"), size), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let d = replicate(&p, size, writers, records, base);
                        base += records;
                        results_ref.lock().expect("lock").entry((size, writers, "pair")).or_default().push(d);
                        total += d;
                    }
                    total
                })
            });
            g.bench_function(BenchmarkId::new(format!("local_store_{writers}_writers"), size), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        write_all(&local, size, writers, records, base, &|| {});
                        base += records;
                        let d = start.elapsed();
                        results_ref
                            .lock()
                            .expect("lock")
                            .entry((size, writers, "local"))
                            .or_default()
                            .push(d);
                        total += d;
                    }
                    total
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
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let got = quic.transfer(&frames);
                    assert_eq!(got as u64, batches * BATCH as u64);
                    let d = start.elapsed();
                    results_ref.lock().expect("lock").entry((size, 0, "quic")).or_default().push(d);
                    total += d;
                }
                total
            })
        });
    }
    g.finish();
    drop(results_ref);

    println!("\npair replication ({records} records per run; medians of the runs above)");
    for size in [256usize, 2048] {
        let quic_med = median(results.get_mut(&(size, 0, "quic")).map(Vec::as_mut_slice).unwrap_or_default());
        let quic_rate = (records.div_ceil(BATCH as u64) * BATCH as u64) as f64 / quic_med.as_secs_f64();
        for writers in [1u64, 8] {
            let pair_med =
                median(results.get_mut(&(size, writers, "pair")).map(Vec::as_mut_slice).unwrap_or_default());
            let local_med =
                median(results.get_mut(&(size, writers, "local")).map(Vec::as_mut_slice).unwrap_or_default());
            let rate = records as f64 / pair_med.as_secs_f64();
            let local_rate = records as f64 / local_med.as_secs_f64();
            println!(
                "  {size:>4} B x{writers}: {rate:>9.0} records/s {:>7.1} MB/s | local store {local_rate:>9.0}/s (ratio {:.2}) | QUIC ceiling {quic_rate:>9.0}/s (ratio {:.3})",
                rate * size as f64 / 1e6,
                rate / local_rate,
                rate / quic_rate,
            );
        }
    }
    lag(&p);
    catch_up(c, p);
}

/// Catch-up: B stops, A takes `records` durable writes (8 writers), B starts again;
/// timed from B's start until it holds them all.
fn catch_up(c: &mut Criterion, mut p: Pair) {
    let records: u64 = if quick() { 2_000 } else { 200_000 };
    let size = 256usize;
    let mut base = 50_000_000u64;
    let mut runs = Vec::new();
    let mut g = c.benchmark_group("catch_up");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(if quick() { 1 } else { 30 }));
    g.throughput(Throughput::Bytes(records * size as u64));
    g.bench_function(BenchmarkId::new("after_downtime", size), |bench| {
        bench.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                p.stop_b();
                write_all(p.a.store(), size, 8, records, base, &|| {});
                base += records;
                let target = p.a.store().vector(StreamId::Enterprise).get(p.a.store().incarnation());
                let start = Instant::now();
                p.start_b();
                let deadline = Instant::now() + Duration::from_secs(300);
                while held_on_b(&p) < target {
                    assert!(Instant::now() < deadline, "B did not catch up");
                    std::thread::sleep(Duration::from_micros(500));
                }
                let d = start.elapsed();
                runs.push(d);
                total += d;
            }
            total
        })
    });
    g.finish();
    let med = median(&mut runs);
    println!(
        "catch-up of {records} records of {size} B after downtime: median {:.2} s = {:.0} records/s, {:.1} MB/s of payload",
        med.as_secs_f64(),
        records as f64 / med.as_secs_f64(),
        (records * size as u64) as f64 / med.as_secs_f64() / 1e6
    );
    p.stop_b();
    p.rt.block_on(p.a.shutdown(Duration::ZERO));
}

/// Replication lag under a steady write rate: each write's time from the start of its
/// durable put on A to its durable apply on B (seen by polling B's vector), p50/p99,
/// next to A's fdatasync p99 over the same writes.
fn lag(p: &Pair) {
    let _guard = p.rt.enter();
    let rate = 10_000u64;
    let records: u64 = if quick() { 1_000 } else { 20_000 };
    let before = p.a_latency.counts();
    let origin = p.a.store().incarnation();
    let first = p.b().store().vector(StreamId::Enterprise).get(origin) + 1;
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(records as usize)));
    let seen: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::with_capacity(records as usize)));
    std::thread::scope(|s| {
        let watcher_seen = seen.clone();
        s.spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut next = first;
            while next < first + records && Instant::now() < deadline {
                let held = p.b().store().vector(StreamId::Enterprise).get(origin);
                let now = Instant::now();
                let mut seen = watcher_seen.lock().expect("lock");
                while next <= held && next < first + records {
                    seen.push(now);
                    next += 1;
                }
                drop(seen);
                std::thread::sleep(Duration::from_micros(50));
            }
        });
        let start = Instant::now();
        let value = vec![7u8; 256];
        for i in 0..records {
            let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            sent.lock().expect("lock").push(Instant::now());
            let mut batch = WriteBatch::new();
            batch.put(Collection::Users, &key(10_000_000 + i), &value);
            p.a.store().write(batch, Durability::Durable).expect("put");
            p.a.notify();
        }
    });
    let sent = sent.lock().expect("lock");
    let seen = seen.lock().expect("lock");
    let mut lags: Vec<Duration> =
        sent.iter().zip(seen.iter()).map(|(s, r)| r.saturating_duration_since(*s)).collect();
    lags.sort();
    let pct =
        |q: f64| lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1))).copied();
    let after = p.a_latency.counts();
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
    println!(
        "replication lag at {rate} writes/s (256 B, {} of {records} writes seen on B): p50 {:.2} ms, p99 {:.2} ms; A's fdatasync p99 {fsync_p99} ({total} fdatasyncs)",
        seen.len(),
        pct(0.50).unwrap_or_default().as_secs_f64() * 1e3,
        pct(0.99).unwrap_or_default().as_secs_f64() * 1e3,
    );
}

criterion_group!(benches, replication);
criterion_main!(benches);
