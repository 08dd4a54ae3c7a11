use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::id::Incarnation;
use crate::limits::VECTOR_ORIGINS_MAX;

/// One write: the `seq`-th write of `origin` in one stream. Sequence numbers start at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// The incarnation that made the write.
    pub origin: Incarnation,
    /// Its position in that origin's writes to the stream, from 1.
    pub seq: u64,
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.origin, self.seq)
    }
}

/// How two version vectors relate causally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    /// Both have seen exactly the same writes.
    Equal,
    /// The left side has seen everything the right has, and more.
    Dominates,
    /// The right side has seen everything the left has, and more.
    DominatedBy,
    /// Each has seen a write the other has not: a true conflict.
    Concurrent,
}

/// A version vector: for each origin, the highest sequence number covered.
///
/// Kept as a vector sorted by origin with no zero entries, which makes equality
/// structural and keeps a per-key version small (most keys name one or two origins).
///
/// ```
/// # use repl_wire::{Causality, Dot, Incarnation, VersionVector};
/// let a = VersionVector::from_dot(Dot { origin: Incarnation(1), seq: 3 });
/// let b = VersionVector::from_dot(Dot { origin: Incarnation(2), seq: 1 });
/// assert_eq!(a.compare(&b), Causality::Concurrent);
/// let joined = a.join(&b);
/// assert_eq!(joined.compare(&a), Causality::Dominates);
/// ```
#[derive(Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct VersionVector(Vec<(Incarnation, u64)>);

impl Clone for VersionVector {
    fn clone(&self) -> Self {
        VersionVector(self.0.clone())
    }

    /// Reuses this vector's allocation (the store copies its submitted vector into a
    /// kept one on every write).
    fn clone_from(&mut self, source: &Self) {
        self.0.clone_from(&source.0);
    }
}

impl VersionVector {
    /// The empty vector: has seen nothing.
    pub fn new() -> Self {
        VersionVector(Vec::new())
    }

    /// The vector covering a single dot and everything before it from that origin.
    pub fn from_dot(dot: Dot) -> Self {
        let mut v = VersionVector::new();
        v.advance(dot);
        v
    }

    /// The sequence number covered for `origin` (0 when none).
    pub fn get(&self, origin: Incarnation) -> u64 {
        match self.0.binary_search_by_key(&origin, |&(o, _)| o) {
            Ok(i) => self.0.get(i).map_or(0, |&(_, s)| s),
            Err(_) => 0,
        }
    }

    /// Raises the entry for `dot.origin` to at least `dot.seq`.
    pub fn advance(&mut self, dot: Dot) {
        if dot.seq == 0 {
            return;
        }
        match self.0.binary_search_by_key(&dot.origin, |&(o, _)| o) {
            Ok(i) => {
                if let Some(slot) = self.0.get_mut(i) {
                    slot.1 = slot.1.max(dot.seq);
                }
            }
            Err(i) => self.0.insert(i, (dot.origin, dot.seq)),
        }
    }

    /// Whether the vector covers `dot`.
    pub fn contains(&self, dot: Dot) -> bool {
        dot.seq <= self.get(dot.origin)
    }

    /// Whether the vector has seen nothing.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of origins named.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The (origin, seq) pairs, sorted by origin.
    pub fn iter(&self) -> impl Iterator<Item = Dot> + '_ {
        self.0.iter().map(|&(origin, seq)| Dot { origin, seq })
    }

    /// Raises every entry to at least the other's (the join, in place).
    pub fn merge(&mut self, other: &VersionVector) {
        if other.0.is_empty() {
            return;
        }
        let mut out = Vec::with_capacity(self.0.len().max(other.0.len()));
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) => match x.0.cmp(&y.0) {
                    Ordering::Less => {
                        out.push(x);
                        a.next();
                    }
                    Ordering::Greater => {
                        out.push(y);
                        b.next();
                    }
                    Ordering::Equal => {
                        out.push((x.0, x.1.max(y.1)));
                        a.next();
                        b.next();
                    }
                },
                (Some(&&x), None) => {
                    out.push(x);
                    a.next();
                }
                (None, Some(&&y)) => {
                    out.push(y);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.0 = out;
    }

    /// The least vector that covers both.
    pub fn join(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.clone();
        out.merge(other);
        out
    }

    /// The greatest vector both cover (entry-wise minimum).
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        let pairs = self
            .0
            .iter()
            .filter_map(|&(o, s)| {
                let m = s.min(other.get(o));
                (m > 0).then_some((o, m))
            })
            .collect();
        VersionVector(pairs)
    }

    /// Whether this vector covers everything `other` covers.
    pub fn descends(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|&(o, s)| self.get(o) >= s)
    }

    /// The causal relation of `self` to `other`.
    pub fn compare(&self, other: &VersionVector) -> Causality {
        match (self.descends(other), other.descends(self)) {
            (true, true) => Causality::Equal,
            (true, false) => Causality::Dominates,
            (false, true) => Causality::DominatedBy,
            (false, false) => Causality::Concurrent,
        }
    }

    /// Drops the entry of `origin` (used when a retired incarnation is folded away).
    pub fn remove(&mut self, origin: Incarnation) {
        self.0.retain(|&(o, _)| o != origin);
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (o, s)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{o}:{s}")?;
        }
        f.write_str("}")
    }
}

impl FromIterator<Dot> for VersionVector {
    fn from_iter<T: IntoIterator<Item = Dot>>(iter: T) -> Self {
        let mut v = VersionVector::new();
        for d in iter {
            v.advance(d);
        }
        v
    }
}

impl<'de> Deserialize<'de> for VersionVector {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Decoded pairs must already be in canonical form: bounded, sorted, unique,
        // no zero entries. Anything else is refused rather than repaired, so equal
        // vectors always have equal bytes.
        let pairs = Vec::<(Incarnation, u64)>::deserialize(deserializer)?;
        if pairs.len() > VECTOR_ORIGINS_MAX {
            return Err(serde::de::Error::custom("version vector names too many origins"));
        }
        let sorted = pairs.windows(2).all(|w| matches!(w, [a, b] if a.0 < b.0));
        if !sorted || pairs.iter().any(|&(_, s)| s == 0) {
            return Err(serde::de::Error::custom("version vector is not canonical"));
        }
        Ok(VersionVector(pairs))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vector() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0u64..6, 1u64..20), 0..6)
            .prop_map(|pairs| pairs.into_iter().map(|(o, seq)| Dot { origin: Incarnation(o), seq }).collect())
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in vector(), b in vector()) {
            prop_assert_eq!(a.join(&b), b.join(&a));
        }

        #[test]
        fn merge_is_associative(a in vector(), b in vector(), c in vector()) {
            prop_assert_eq!(a.join(&b).join(&c), a.join(&b.join(&c)));
        }

        #[test]
        fn merge_is_idempotent(a in vector(), b in vector()) {
            prop_assert_eq!(a.join(&a), a.clone());
            let ab = a.join(&b);
            prop_assert_eq!(ab.join(&b), ab);
        }

        #[test]
        fn join_is_least_upper_bound(a in vector(), b in vector(), c in vector()) {
            let j = a.join(&b);
            prop_assert!(j.descends(&a) && j.descends(&b));
            if c.descends(&a) && c.descends(&b) {
                prop_assert!(c.descends(&j));
            }
            let m = a.meet(&b);
            prop_assert!(a.descends(&m) && b.descends(&m));
        }

        #[test]
        fn compare_is_antisymmetric(a in vector(), b in vector()) {
            let flipped = match a.compare(&b) {
                Causality::Dominates => Causality::DominatedBy,
                Causality::DominatedBy => Causality::Dominates,
                other => other,
            };
            prop_assert_eq!(b.compare(&a), flipped);
            prop_assert_eq!(a.compare(&b) == Causality::Equal, a == b);
        }

        #[test]
        fn codec_round_trip(a in vector()) {
            let bytes = postcard::to_allocvec(&a).expect("vectors always encode");
            prop_assert_eq!(postcard::from_bytes::<VersionVector>(&bytes).expect("canonical"), a);
        }
    }

    #[test]
    fn non_canonical_vectors_are_refused() {
        let unsorted = vec![(Incarnation(2), 1u64), (Incarnation(1), 1)];
        let bytes = postcard::to_allocvec(&unsorted).expect("encodes");
        assert!(postcard::from_bytes::<VersionVector>(&bytes).is_err());
        let zero = vec![(Incarnation(1), 0u64)];
        let bytes = postcard::to_allocvec(&zero).expect("encodes");
        assert!(postcard::from_bytes::<VersionVector>(&bytes).is_err());
    }
}
