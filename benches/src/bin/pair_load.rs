//! The pair workload of `benches/compare/postgres.sh`, on repl: a G4 database pair
//! on loopback (real node runtimes, real files), WRITERS clients each with its own
//! QUIC connection to the first database appliance, each writing one record per
//! durable call, one call at a time; timed from the first write until every record
//! is durable on the second appliance (and, in sync mode, every call acknowledged,
//! which there implies it). Prints a summary line, then `rows_per_s mb_per_s` alone
//! on the last line for the script.
//!
//! `pair_load --mode async|sync --size BYTES --writers N --records N`

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use repl_benches::cluster::{Cluster, G4_PAIR};
use repl_benches::key;
use repl_engine::runtime::{PairMode, PairTimeout};
use repl_engine::topology::Generation;
use repl_wire::{Collection, StreamId};

struct Args {
    sync: bool,
    size: usize,
    writers: u64,
    records: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { sync: false, size: 256, writers: 8, records: 20_000 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || value.parse::<u64>().map_err(|_| format!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--mode" => {
                args.sync = match value.as_str() {
                    "sync" => true,
                    "async" => false,
                    other => return Err(format!("--mode: expected async or sync, got {other}")),
                }
            }
            "--size" => args.size = number()? as usize,
            "--writers" => args.writers = number()?.max(1),
            "--records" => args.records = number()?.max(1),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("pair_load: {e}");
            return ExitCode::from(2);
        }
    };
    let pair = if args.sync {
        PairMode::Sync { timeout_ms: 5_000, on_timeout: PairTimeout::FailClosed }
    } else {
        PairMode::Async
    };
    let cluster = Cluster::start(Generation::G4, G4_PAIR, pair);
    let per = args.records / args.writers;
    let total = per * args.writers;
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    cluster.rt.block_on(async {
        let mut tasks = Vec::new();
        for w in 0..args.writers {
            let client = cluster.client(&format!("writer{w}"), &[0]);
            let failed = failed.clone();
            let value = vec![b'x'; args.size];
            tasks.push(tokio::spawn(async move {
                for i in 0..per {
                    if client.put(Collection::Users, &key(w * per + i), &value).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    // Every record durable on the second appliance.
    let users_written = cluster.node(0).store().scan_keys(Collection::Users, b"", usize::MAX).len() as u64;
    let target = cluster.held(0, StreamId::Enterprise, 0);
    cluster.wait_held(1, StreamId::Enterprise, 0, target, Duration::from_secs(300));
    let elapsed = start.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    let rows = total as f64 / elapsed;
    println!(
        "repl pair {} mode: {total} records of {} B, {} writers, {users_written} keys on A, {failed} failed, {elapsed:.2} s end to end",
        if args.sync { "sync" } else { "async" },
        args.size,
        args.writers
    );
    cluster.shutdown();
    if failed > 0 || users_written < total {
        eprintln!("pair_load: {failed} writes failed, {users_written} of {total} keys written");
        return ExitCode::from(1);
    }
    println!("{rows:.0} {:.2}", rows * args.size as f64 / 1e6);
    ExitCode::SUCCESS
}
