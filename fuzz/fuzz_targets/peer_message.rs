//! Peer messages: decoding never panics, and whatever decodes re-encodes to a frame
//! that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use repl_wire::{decode_frame, encode_frame, PeerMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = decode_frame::<PeerMessage>(data) {
        let frame = encode_frame(&m).expect("a decoded message re-encodes");
        assert_eq!(decode_frame::<PeerMessage>(&frame[4..]).expect("round trip"), m);
    }
});
