//! Profiling aid for the catch-up path, quicker than the criterion bench (which
//! adds a million records per run to an ever larger pair): a G4 pair, B stopped, A
//! takes `RECORDS` durable 256 B writes in batches of 1,000, B restarts; prints how
//! long until B holds them. `cargo run --release -p repl-benches --example
//! catch_up_probe -- [RECORDS] [RUNS]` (with `PROBE_PAUSE` set it prints `ready` and
//! waits for a line on stdin before each catch-up, for a profiler to attach).
//! With `PROBE_BOOTSTRAP` set, B restarts empty and A keeps no log beyond its active
//! segment, so B is bootstrapped by snapshot instead.

use std::time::{Duration, Instant};

use repl_benches::cluster::process_cpu_seconds;
use repl_benches::cluster::{Cluster, G4_PAIR};
use repl_benches::{key_spread, value_256};
use repl_engine::runtime::PairMode;
use repl_engine::topology::Generation;
use repl_engine::{Durability, StoreOptions, WriteBatch};
use repl_wire::{Collection, StreamId};

/// Marks the start of a measurement among the appliances' log lines (with `RUST_LOG`).
fn tracing_log_start() {
    if std::env::var_os("RUST_LOG").is_some() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        eprintln!("probe: restarting B at {:.6} s since the epoch", now.as_secs_f64());
    }
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        // The appliances' own log (repairs, sessions) on stderr, for reading a profile.
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let records = args.first().copied().unwrap_or(200_000);
    let runs = args.get(1).copied().unwrap_or(3);
    let bootstrap = std::env::var_os("PROBE_BOOTSTRAP").is_some();
    let options = if bootstrap {
        StoreOptions { log_retained_bytes_max: 0, segment_bytes: 1 << 20, ..StoreOptions::default() }
    } else {
        StoreOptions::default()
    };
    let mut p = Cluster::start_with(Generation::G4, G4_PAIR, PairMode::Async, options);
    let mut base = 0;
    for _ in 0..runs {
        p.stop(1);
        let a = p.node(0).store();
        for chunk in (base..base + records).step_by(1_000) {
            let mut b = WriteBatch::new();
            for i in chunk..(chunk + 1_000).min(base + records) {
                b.put(Collection::Users, &key_spread(i), &value_256(i));
            }
            a.write(b, Durability::Durable).expect("write on A");
        }
        base += records;
        let target = a.vector(StreamId::Enterprise).get(a.incarnation());
        if bootstrap {
            a.compact(StreamId::Enterprise, &a.vector(StreamId::Enterprise)).expect("compact A");
        }
        if std::env::var_os("PROBE_PAUSE").is_some() {
            // Lets a profiler attach for the catch-up alone: go on at a line on stdin.
            println!("ready");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).expect("stdin");
        }
        let cpu = process_cpu_seconds();
        let start = Instant::now();
        tracing_log_start();
        if bootstrap {
            p.restart_empty(1);
        } else {
            p.restart(1);
        }
        p.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(600));
        let secs = start.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds() - cpu;
        println!(
            "{} of {records} records: {secs:.2} s ({cpu:.2} s CPU, {:.1} us per record), {:.0} records/s, {:.1} MB/s",
            if bootstrap { "bootstrap" } else { "catch-up" },
            cpu / records as f64 * 1e6,
            records as f64 / secs,
            records as f64 * 256.0 / secs / 1e6
        );
    }
    p.shutdown();
}
