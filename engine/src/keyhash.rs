//! A fast hasher for the store's in-memory maps of keys (the overlay of queued
//! writes). std's SipHash cost about 300 instructions per lookup of a 17-byte key,
//! four lookups per write: 9% of a durable put's instructions (callgrind). This one
//! mixes a word at a time and finishes with an avalanche, seeded per map from std's
//! random source, so keys chosen by a client cannot be aimed at one bucket without
//! knowing the seed. The maps it serves hold only keys with writes in flight, so
//! even a bad spread stays bounded by the write queue.

use std::hash::{BuildHasher, Hasher};

/// Builds [`KeyHasher`]s with a seed drawn once per map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildKeyHasher {
    seed: u64,
}

impl Default for BuildKeyHasher {
    fn default() -> Self {
        BuildKeyHasher { seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) }
    }
}

impl BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { state: self.seed }
    }
}

/// Word-at-a-time multiply-rotate mixing (as rustc's FxHash) with a final avalanche,
/// since the map takes its control bits from the hash's top bits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher {
    state: u64,
}

/// An odd constant with well-spread bits (the one FxHash uses).
const MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;

impl KeyHasher {
    fn add(&mut self, word: u64) {
        self.state = (self.state.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            // The length keeps "ab" and "ab\0" apart.
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        // murmur3's 64-bit finalizer: every input bit reaches the top bits.
        let mut h = self.state;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn similar_keys_spread_over_the_top_bits() {
        let build = BuildKeyHasher::default();
        // Keys that differ in one late character, as sequential ids do.
        let tops: HashSet<u64> =
            (0..4_096u32).map(|i| build.hash_one(format!("user-0-{i:010}").as_bytes()) >> 57).collect();
        assert_eq!(tops.len(), 128, "every 7-bit control value is used");
        let lows: HashSet<u64> =
            (0..4_096u32).map(|i| build.hash_one(format!("user-0-{i:010}").as_bytes()) & 1023).collect();
        assert!(lows.len() > 900, "bucket bits spread: {} of 1024 used", lows.len());
    }

    #[test]
    fn trailing_zero_bytes_and_seeds_make_different_hashes() {
        let build = BuildKeyHasher::default();
        assert_ne!(build.hash_one(&b"ab"[..]), build.hash_one(&b"ab\0"[..]));
        let other = BuildKeyHasher { seed: build.seed ^ 1 };
        assert_ne!(build.hash_one(&b"user-1"[..]), other.hash_one(&b"user-1"[..]));
    }
}
