//! Client requests and replies: decoding never panics and round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repl_wire::{decode_frame, encode_frame, ClientReply, ClientRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_frame::<ClientRequest>(data) {
        let frame = encode_frame(&m).expect("re-encodes");
        assert_eq!(decode_frame::<ClientRequest>(&frame[4..]).expect("round trip"), m);
    }
    if let Ok(m) = decode_frame::<ClientReply>(data) {
        let frame = encode_frame(&m).expect("re-encodes");
        assert_eq!(decode_frame::<ClientReply>(&frame[4..]).expect("round trip"), m);
    }
});
