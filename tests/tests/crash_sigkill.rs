//! A real child process writes durably from four threads and is SIGKILLed at random
//! points, 50 times; after each kill the store must reopen with every acknowledged
//! write present and intact, and nothing else corrupt.
//!
//! SIGKILL keeps the page cache, so this test cannot see a missing fsync (the
//! power-cut sweep does); it shows that recovery handles a process dying anywhere,
//! including mid-append, and that group commit acknowledges only what it wrote.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use repl_engine::{Store, StoreOptions};
use repl_tests::seed_from_env;
use repl_wire::Collection;

const CYCLES: u64 = 50;
const THREADS: u64 = 4;

/// Parses `ACK <thread> <n>`.
fn parse_ack(line: &str) -> (u64, u64) {
    let mut parts =
        line.split_whitespace().skip(1).map(|p| p.parse::<u64>().expect("the writer prints numbers"));
    (parts.next().expect("thread"), parts.next().expect("n"))
}

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn acknowledged_writes_survive_sigkill_at_random_points() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = seed_from_env(0x5eed) | 1;
    let mut total_acked = 0u64;
    for cycle in 0..CYCLES {
        let mut child = Command::new(env!("CARGO_BIN_EXE_crash_writer"))
            .arg(dir.path())
            .arg(cycle.to_string())
            .arg(THREADS.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().expect("piped stdout");
        let target = 1 + next(&mut rng) % 300;
        // A reader thread forwards acknowledgements, so waiting for them has a real
        // deadline even if the writer hangs without closing its output.
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(parse_ack(&line)).is_err() {
                    return;
                }
            }
        });
        let mut acked: Vec<(u64, u64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while (acked.len() as u64) < target {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(ack) => acked.push(ack),
                Err(e) => {
                    let _ = child.kill();
                    panic!("cycle {cycle}: no acknowledgement in time ({e})");
                }
            }
        }
        child.kill().expect("SIGKILL the writer");
        // Acks printed before the kill were acknowledged too: collect them all.
        reader.join().expect("the reader thread ends when the writer's output closes");
        acked.extend(rx.try_iter());
        child.wait().expect("reap the writer");

        let store = Store::open_dir(
            dir.path(),
            StoreOptions { segment_bytes: 256 * 1024, ..StoreOptions::default() },
        )
        .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
        for (t, n) in &acked {
            let key = format!("c{cycle}-t{t}-{n}");
            let want = format!("{key}-payload-").repeat(1 + (n % 5) as usize);
            let read = store.get(Collection::Users, key.as_bytes()).expect("read");
            assert_eq!(read.value(), Some(want.as_bytes()), "cycle {cycle}: acknowledged {key} lost");
        }
        // The log replays cleanly from start to end (no corruption anywhere).
        let me = store.incarnation();
        let vector = store.vector(repl_wire::StreamId::Enterprise);
        let shipped = store
            .entries_since(repl_wire::StreamId::Enterprise, &repl_wire::VersionVector::new(), usize::MAX)
            .expect("the whole log reads back");
        assert_eq!(shipped.len() as u64, vector.get(me), "cycle {cycle}: log and vector disagree");
        total_acked += acked.len() as u64;
        if cycle % 10 == 9 {
            store.checkpoint().expect("checkpoint between cycles");
        }
    }
    assert!(total_acked >= CYCLES);
}
