//! Child process for the SIGKILL crash test: writes durably from several threads and
//! prints `ACK <thread> <n>` after each acknowledged write, until it is killed.
//!
//! Usage: `crash_writer <data-dir> <cycle> <threads>`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use repl_engine::{Store, StoreOptions, WriteBatch};
use repl_wire::Collection;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(cycle), Some(threads)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("usage: crash_writer <data-dir> <cycle> <threads>");
        std::process::exit(2);
    };
    let cycle: u64 = cycle.parse().expect("cycle is a number");
    let threads: u64 = threads.parse().expect("threads is a number");
    let options = StoreOptions { segment_bytes: 256 * 1024, ..StoreOptions::default() };
    let store = match Store::open_dir(dir, options) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("open failed: {e}");
            std::process::exit(3);
        }
    };
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let store = store.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for n in 0u64.. {
                    let key = format!("c{cycle}-t{t}-{n}");
                    let value = format!("{key}-payload-").repeat(1 + (n % 5) as usize);
                    // Thread 0 uses single puts; the others pipeline a few writes at once.
                    let ok = if t == 0 {
                        store.put(Collection::Users, key.as_bytes(), value.as_bytes()).is_ok()
                    } else {
                        let mut batch = WriteBatch::new();
                        batch.put(Collection::Users, key.as_bytes(), value.as_bytes());
                        store.submit(batch).and_then(|p| p.wait()).is_ok()
                    };
                    if !ok {
                        return;
                    }
                    let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = writeln!(out, "ACK {t} {n}");
                    let _ = out.flush();
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
}
