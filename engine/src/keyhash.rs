//! A fast keyed hasher for the store's in-memory maps of keys (the keydir and the
//! overlay of queued writes). std's SipHash cost about 300 instructions per lookup of
//! a 17-byte key (callgrind), several lookups per write. This one folds a word at a
//! time through a 64x64->128-bit multiply by a secret (drawn once per process for
//! the store's maps, [`BuildKeyHasher::shared`]; the "folded multiply" of wyhash
//! and foldhash) and ends with an avalanche. The keydir
//! holds keys clients choose (user names, session ids); with the multiplier secret, a
//! difference in a key does not reach the state in a way that can be planned without
//! it, so keys cannot be aimed at one bucket from outside. (The multiply-rotate mixing
//! this replaced had collisions that held for every seed: flip the top bit of the
//! first word and bit 4 of the second; a test keeps that pair apart.)

use std::hash::{BuildHasher, Hasher};

/// Builds [`KeyHasher`]s with a seed and a multiplier drawn once per map.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BuildKeyHasher {
    seed: u64,
    multiplier: u64,
}

impl Default for BuildKeyHasher {
    fn default() -> Self {
        let random = std::collections::hash_map::RandomState::new();
        BuildKeyHasher {
            seed: random.hash_one(0x5eed_u64),
            // Odd, so the multiply loses no low bit.
            multiplier: random.hash_one(0x6d75_6c74_u64) | 1,
        }
    }
}

impl BuildKeyHasher {
    /// The hasher of every key map of this process, drawn once: the keydir, the
    /// overlay and a batch's index then agree on a key's hash, which a write computes
    /// once, before it takes the state lock.
    pub(crate) fn shared() -> Self {
        static SHARED: std::sync::OnceLock<BuildKeyHasher> = std::sync::OnceLock::new();
        *SHARED.get_or_init(BuildKeyHasher::default)
    }
}

impl BuildHasher for BuildKeyHasher {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher { state: self.seed, multiplier: self.multiplier }
    }
}

/// The state of one hash: each word is folded in by a keyed multiply.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyHasher {
    state: u64,
    multiplier: u64,
}

/// The high and low halves of the full product, xored: every bit of either factor
/// reaches many bits of the result.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

impl KeyHasher {
    fn add(&mut self, word: u64) {
        // The rotation keeps a word equal to the state (which zeroes the xor) from
        // erasing what came before: the state is mixed back in after the multiply.
        self.state = folded_multiply(self.state ^ word, self.multiplier) ^ self.state.rotate_left(23);
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
        // murmur3's 64-bit finalizer: every input bit reaches the top bits, which the
        // map takes its control bytes from.
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
        let other = BuildKeyHasher { seed: build.seed ^ 1, ..build };
        assert_ne!(build.hash_one(&b"user-1"[..]), other.hash_one(&b"user-1"[..]));
    }

    #[test]
    fn differences_planned_without_the_secret_do_not_collide() {
        // Against multiply-rotate mixing (state = (rotl(state, 5) ^ word) * odd), the
        // top bit of the first word only ever flips the top bit of the state, which the
        // rotation moves to bit 4: flipping that bit of the second word cancels it, for
        // every seed. The keyed fold must keep such pairs apart.
        for trial in 0..64u64 {
            let build = BuildKeyHasher::default();
            let mut a = [0u8; 16];
            a[..8].copy_from_slice(&(trial * 0x0101_0101).to_le_bytes());
            a[8..].copy_from_slice(&trial.to_le_bytes());
            let mut b = a;
            b[7] ^= 0x80;
            b[8] ^= 0x10;
            assert_ne!(build.hash_one(a), build.hash_one(b), "trial {trial}");
        }
    }
}
