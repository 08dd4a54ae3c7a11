//! The frame reader never panics, never returns a frame over the limit, and splits a
//! byte stream the same way whatever the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repl_wire::limits::FRAME_BYTES_MAX;
use repl_wire::FrameReader;

fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(1, |b| *b as usize % 17 + 1);
    let mut whole = FrameReader::new();
    whole.push(data);
    let mut chunked = FrameReader::new();
    let mut a = Vec::new();
    while let Ok(Some(f)) = whole.next_frame() {
        assert!(f.len() <= FRAME_BYTES_MAX && !f.is_empty());
        a.push(f);
    }
    let mut b = Vec::new();
    for chunk in data.chunks(split) {
        chunked.push(chunk);
        while let Ok(Some(f)) = chunked.next_frame() {
            b.push(f);
        }
    }
    assert_eq!(a, b);
});
