//! Hash trees for anti-entropy: which keys two replicas hold differently, found with
//! traffic that grows with the difference, not with the data set.
//!
//! Keys fall into [`TREE_LEAVES`] leaf buckets by a fixed hash of (collection, key),
//! the same on every appliance and every build. A key's digest is blake3 over its
//! collection, key and live versions (dot and tombstone flag, sorted by dot; versions
//! expired at the agreed cut-off left out). Contexts are left out: two replicas may
//! learn of a last-writer-wins loser at different times, and hold the same data. A leaf bucket's hash is the sum, modulo
//! 2^256, of its keys' digests: a function of the set of (key, version digest) pairs
//! like a hash over the sorted pairs, but one a write updates in O(1) (subtract the
//! key's old digest, add the new one), which is how the store keeps it current. An
//! inner bucket's hash is blake3 over its [`TREE_FANOUT`] children's hashes.

use repl_wire::{BucketHash, Collection};

use crate::versions::Version;

/// Children per inner bucket.
pub const TREE_FANOUT: u32 = 16;
/// Level of the leaf buckets (the root is level 0).
pub const TREE_LEAF_LEVEL: u8 = 4;
/// Number of leaf buckets.
pub const TREE_LEAVES: u32 = 65_536;

/// Buckets at a level of the tree.
pub fn buckets_at(level: u8) -> u32 {
    TREE_FANOUT.pow(u32::from(level.min(TREE_LEAF_LEVEL)))
}

/// The leaf bucket of a key: FNV-1a (64-bit) over the collection name and the key,
/// its top 16 bits. Fixed forever, since replicas compare buckets by index.
pub(crate) fn leaf_of(collection: Collection, key: &[u8]) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in collection.name().as_bytes().iter().chain([0xffu8].iter()).chain(key) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Fold the low bits in: FNV's top bits mix poorly for short inputs.
    h ^= h << 29;
    h = h.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 48) as u32
}

/// A 256-bit digest as four little-endian limbs, added and subtracted modulo 2^256.
pub(crate) type Sum = [u64; 4];

/// The digest of a key's versions that are live at `cutoff_ms`, or `None` when none are
/// (an absent key and a fully expired key look the same).
///
/// A `cutoff_ms` of 0 is for the trees kept current as writes merge (every stream but
/// sessions, whose tree is built at the cutoff asked for): those leave out every
/// version that expires (the write answers of the enterprise stream). Each appliance
/// drops an expired version at its own moment, so counting them would make the roots
/// of replicas holding the same entries differ until the last one expired.
pub(crate) fn key_digest(
    collection: Collection,
    key: &[u8],
    versions: &[Version],
    cutoff_ms: u64,
) -> Option<Sum> {
    let counted = |v: &&Version| match cutoff_ms {
        0 => v.expires_at_ms.is_none(),
        _ => !v.is_expired(cutoff_ms),
    };
    let mut live: Vec<(u64, u64, bool)> =
        versions.iter().filter(counted).map(|v| (v.dot.origin.0, v.dot.seq, v.tombstone)).collect();
    if live.is_empty() {
        return None;
    }
    live.sort_unstable();
    let mut h = blake3::Hasher::new();
    h.update(collection.name().as_bytes());
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    for (origin, seq, tombstone) in live {
        h.update(&origin.to_le_bytes());
        h.update(&seq.to_le_bytes());
        h.update(&[u8::from(tombstone)]);
    }
    let bytes = h.finalize();
    let b = bytes.as_bytes();
    let limb = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Some([limb(0), limb(1), limb(2), limb(3)])
}

fn add(a: &mut Sum, b: &Sum) {
    let mut carry = false;
    for (x, y) in a.iter_mut().zip(b) {
        let (s1, c1) = x.overflowing_add(*y);
        let (s2, c2) = s1.overflowing_add(u64::from(carry));
        *x = s2;
        carry = c1 || c2;
    }
}

fn sub(a: &mut Sum, b: &Sum) {
    let mut borrow = false;
    for (x, y) in a.iter_mut().zip(b) {
        let (s1, c1) = x.overflowing_sub(*y);
        let (s2, c2) = s1.overflowing_sub(u64::from(borrow));
        *x = s2;
        borrow = c1 || c2;
    }
}

fn sum_bytes(s: &Sum) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, limb) in s.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&limb.to_le_bytes());
    }
    out
}

/// The leaf sums of one stream's tree.
#[derive(Debug, Clone)]
pub(crate) struct HashTree {
    leaves: Vec<Sum>,
}

impl Default for HashTree {
    fn default() -> Self {
        HashTree { leaves: vec![[0; 4]; TREE_LEAVES as usize] }
    }
}

impl HashTree {
    /// Replaces a key's digest: `old` out, `new` in.
    pub(crate) fn update(&mut self, collection: Collection, key: &[u8], old: Option<Sum>, new: Option<Sum>) {
        if old == new {
            return;
        }
        let leaf = &mut self.leaves[leaf_of(collection, key) as usize];
        if let Some(o) = old {
            sub(leaf, &o);
        }
        if let Some(n) = new {
            add(leaf, &n);
        }
    }

    /// The hashes of `buckets` at `level` (indexes out of range are skipped).
    pub(crate) fn hashes(&self, level: u8, buckets: &[u32]) -> Vec<BucketHash> {
        let level = level.min(TREE_LEAF_LEVEL);
        let mut row: Vec<[u8; 32]> = self.leaves.iter().map(sum_bytes).collect();
        for _ in level..TREE_LEAF_LEVEL {
            row = row
                .chunks(TREE_FANOUT as usize)
                .map(|children| {
                    let mut h = blake3::Hasher::new();
                    for c in children {
                        h.update(c);
                    }
                    *h.finalize().as_bytes()
                })
                .collect();
        }
        buckets
            .iter()
            .filter_map(|&b| row.get(b as usize).map(|hash| BucketHash { bucket: b, hash: *hash }))
            .collect()
    }
}

/// The children of `bucket` at the next level.
pub fn children(bucket: u32) -> impl Iterator<Item = u32> {
    (0..TREE_FANOUT).map(move |c| bucket * TREE_FANOUT + c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_order_independent_and_reversible() {
        let d = |i: u64| [i.wrapping_mul(0x1234_5678_9abc_def1), !i, i << 7, u64::MAX - i];
        let mut a = HashTree::default();
        let mut b = HashTree::default();
        for i in 0..100u64 {
            a.update(Collection::Users, b"k", None, Some(d(i)));
        }
        for i in (0..100u64).rev() {
            b.update(Collection::Users, b"k", None, Some(d(i)));
        }
        assert_eq!(a.hashes(0, &[0]), b.hashes(0, &[0]));
        b.update(Collection::Users, b"k", Some(d(5)), None);
        assert_ne!(a.hashes(0, &[0]), b.hashes(0, &[0]));
        b.update(Collection::Users, b"k", None, Some(d(5)));
        assert_eq!(
            a.hashes(4, &[leaf_of(Collection::Users, b"k")]),
            b.hashes(4, &[leaf_of(Collection::Users, b"k")])
        );
    }

    #[test]
    fn keys_spread_over_the_leaves() {
        let mut used = std::collections::BTreeSet::new();
        for i in 0..10_000u32 {
            used.insert(leaf_of(Collection::Users, format!("user{i}").as_bytes()));
        }
        // 10,000 keys into 65,536 buckets: about 9,300 distinct if the hash spreads.
        assert!(used.len() > 9_000, "{} distinct leaves", used.len());
        assert_eq!(buckets_at(TREE_LEAF_LEVEL), TREE_LEAVES);
        assert_eq!(children(3).collect::<Vec<_>>()[0], 48);
    }
}
