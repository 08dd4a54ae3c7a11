//! Entries (the log and replication unit): decoding never panics and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repl_wire::Entry;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Entry::decode(data) {
        assert_eq!(Entry::decode(&e.encode()).expect("round trip"), e);
    }
});
