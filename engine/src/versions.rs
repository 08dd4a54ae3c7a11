//! Per-key versions and the conflict rules of DESIGN section 4.
//!
//! A key holds one or more versions, each a dotted version vector: the write's own
//! `dot` plus the `context` of versions it superseded. A version `a` supersedes `b`
//! when `a.context` covers `b.dot`; two versions neither of which supersedes the
//! other are concurrent. Everything here is pure: no I/O, no clock.

use std::cmp::Ordering;
use std::sync::Arc;

use repl_wire::{Dot, Entry, Hlc, Op, VersionVector};
use serde::{Deserialize, Serialize};

/// Most concurrent versions a `KeepSiblings` key holds before falling back to LWW.
pub const SIBLINGS_MAX: usize = 8;

/// How a collection resolves concurrent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConflictPolicy {
    /// Highest HLC wins, then the higher origin; the loser becomes a conflict record.
    #[default]
    LastWriterWins,
    /// Keep every concurrent version for the application to resolve (up to
    /// [`SIBLINGS_MAX`], then LWW).
    KeepSiblings,
}

/// Where a version's entry bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Loc {
    /// In a segment file: entry header offset and length (header included).
    Disk { file: u32, offset: u32, len: u32 },
    /// Queued for the next commit; the encoded entry, without header.
    #[serde(skip)]
    Pending(Arc<Vec<u8>>),
}

/// One version of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Version {
    pub(crate) dot: Dot,
    pub(crate) hlc: Hlc,
    /// What this version supersedes (for an LWW merge: both sides' contexts and the
    /// losers' dots, so the result does not depend on arrival order).
    pub(crate) context: VersionVector,
    pub(crate) tombstone: bool,
    pub(crate) expires_at_ms: Option<u64>,
    pub(crate) loc: Loc,
}

impl Version {
    pub(crate) fn from_entry(entry: &Entry, loc: Loc) -> Version {
        let (tombstone, expires_at_ms) = match &entry.op {
            Op::Put { expires_at_ms, .. } => (false, *expires_at_ms),
            Op::Delete => (true, None),
            _ => (false, None),
        };
        Version {
            dot: entry.dot,
            hlc: entry.hlc,
            context: entry.context.clone(),
            tombstone,
            expires_at_ms,
            loc,
        }
    }

    /// Whether this version makes `other` obsolete.
    pub(crate) fn supersedes(&self, other: &Version) -> bool {
        self.context.contains(other.dot)
    }

    /// The LWW order: HLC, then origin, then sequence (total and deterministic).
    fn lww_cmp(&self, other: &Version) -> Ordering {
        (self.hlc, self.dot.origin, self.dot.seq).cmp(&(other.hlc, other.dot.origin, other.dot.seq))
    }

    pub(crate) fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|t| t <= now_ms)
    }
}

/// The causal context covering every version held.
pub(crate) fn context_of(versions: &[Version]) -> VersionVector {
    let mut ctx = VersionVector::new();
    for v in versions {
        ctx.merge(&v.context);
        ctx.advance(v.dot);
    }
    ctx
}

/// What merging one incoming version did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Merge {
    /// The incoming version was already superseded (or is a duplicate): nothing changed.
    Obsolete,
    /// Applied; the listed versions lost an LWW resolution and are kept as conflict
    /// records by the caller (they may include the incoming version itself).
    Applied { losers: Vec<Version> },
}

/// Merges `incoming` into `held` under `policy`.
///
/// `covered` is the receiver's stream vector: a version none of whose dots is above
/// it, and which is not held, was superseded or deleted and collected here, so it is
/// obsolete and never resurrected.
pub(crate) fn merge(
    policy: ConflictPolicy,
    held: &mut Vec<Version>,
    incoming: Version,
    covered: Option<&VersionVector>,
) -> Merge {
    if let Some(i) = held.iter().position(|h| h.dot == incoming.dot) {
        // The same write, known here to supersede less than there (a last-writer-wins
        // merge joined a loser in there, as a snapshot shows): learn what it supersedes.
        if held[i].context.descends(&incoming.context) {
            return Merge::Obsolete;
        }
        held[i].context.merge(&incoming.context);
        let same = held.swap_remove(i);
        let (superseded, kept): (Vec<Version>, Vec<Version>) =
            std::mem::take(held).into_iter().partition(|h| same.supersedes(h));
        *held = kept;
        held.push(same);
        return Merge::Applied { losers: superseded };
    }
    if held.iter().any(|h| h.supersedes(&incoming)) {
        return Merge::Obsolete;
    }
    if let Some(covered) = covered {
        if covered.contains(incoming.dot) && covered.descends(&incoming.context) {
            return Merge::Obsolete;
        }
    }
    held.retain(|h| !incoming.supersedes(h));
    // Most keys hold one version for life: grow by exactly one, not to the usual four,
    // which would triple the keydir's memory per key.
    held.reserve_exact(1);
    held.push(incoming);
    if held.len() == 1 || (policy == ConflictPolicy::KeepSiblings && held.len() <= SIBLINGS_MAX) {
        return Merge::Applied { losers: Vec::new() };
    }
    // Last writer wins among the concurrent versions.
    let winner_at = held
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.lww_cmp(b.1))
        .map(|(i, _)| i)
        .expect("held holds at least two versions here");
    let mut winner = held.swap_remove(winner_at);
    let losers = std::mem::take(held);
    for l in &losers {
        winner.context.merge(&l.context);
        winner.context.advance(l.dot);
    }
    held.push(winner);
    Merge::Applied { losers }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use repl_wire::Incarnation;

    use super::*;

    fn version(origin: u64, seq: u64, wall: u64, context: &[(u64, u64)]) -> Version {
        Version {
            dot: Dot { origin: Incarnation(origin), seq },
            hlc: Hlc { wall_ms: wall, logical: 0 },
            context: context.iter().map(|&(o, s)| Dot { origin: Incarnation(o), seq: s }).collect(),
            tombstone: false,
            expires_at_ms: None,
            loc: Loc::Disk { file: 0, offset: 0, len: 0 },
        }
    }

    #[test]
    fn dominated_replaces_dominating_is_obsolete() {
        let mut held = vec![version(1, 1, 10, &[])];
        let newer = version(2, 1, 20, &[(1, 1)]);
        assert_eq!(
            merge(ConflictPolicy::LastWriterWins, &mut held, newer.clone(), None),
            Merge::Applied { losers: vec![] }
        );
        assert_eq!(held, vec![newer]);
        let stale = version(1, 1, 10, &[]);
        assert_eq!(merge(ConflictPolicy::LastWriterWins, &mut held, stale, None), Merge::Obsolete);
    }

    #[test]
    fn lww_keeps_loser_and_joins() {
        let mut held = vec![version(1, 1, 10, &[])];
        let Merge::Applied { losers } =
            merge(ConflictPolicy::LastWriterWins, &mut held, version(2, 1, 5, &[]), None)
        else {
            panic!("concurrent write applies")
        };
        assert_eq!(losers.len(), 1);
        assert_eq!(losers[0].dot.origin, Incarnation(2));
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].dot.origin, Incarnation(1));
        assert!(held[0].context.contains(losers[0].dot));
    }

    #[test]
    fn the_same_write_with_a_wider_context_supersedes_what_it_covers() {
        let mut held = vec![version(1, 1, 10, &[]), version(2, 1, 5, &[])];
        // Elsewhere a merge made (1,1) the winner over (3,1) and (2,1).
        let wider = version(1, 1, 10, &[(2, 1), (3, 1)]);
        let Merge::Applied { losers } = merge(ConflictPolicy::KeepSiblings, &mut held, wider.clone(), None)
        else {
            panic!("a wider context is news")
        };
        assert_eq!(losers.len(), 1);
        assert_eq!(held, vec![wider.clone()]);
        assert_eq!(merge(ConflictPolicy::KeepSiblings, &mut held, wider, None), Merge::Obsolete);
    }

    #[test]
    fn siblings_are_kept_then_bounded() {
        let mut held = Vec::new();
        for origin in 0..SIBLINGS_MAX as u64 {
            merge(ConflictPolicy::KeepSiblings, &mut held, version(origin + 1, 1, origin, &[]), None);
        }
        assert_eq!(held.len(), SIBLINGS_MAX);
        let out = merge(ConflictPolicy::KeepSiblings, &mut held, version(100, 1, 1, &[]), None);
        assert!(matches!(out, Merge::Applied { ref losers } if losers.len() == SIBLINGS_MAX));
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn covered_but_unheld_is_obsolete() {
        let mut held = Vec::new();
        let covered: VersionVector = [Dot { origin: Incarnation(1), seq: 5 }].into_iter().collect();
        assert_eq!(
            merge(ConflictPolicy::LastWriterWins, &mut held, version(1, 3, 1, &[]), Some(&covered)),
            Merge::Obsolete
        );
        assert!(held.is_empty());
        assert!(matches!(
            merge(ConflictPolicy::LastWriterWins, &mut held, version(1, 6, 1, &[]), Some(&covered)),
            Merge::Applied { .. }
        ));
    }

    /// A causal history: each write by a random origin sees a random prefix of the
    /// writes so far (what it had received), with HLCs that respect what it saw.
    fn history() -> impl Strategy<Value = Vec<Version>> {
        proptest::collection::vec((1u64..4, any::<u16>(), 0u64..3), 1..=SIBLINGS_MAX).prop_map(|steps| {
            let mut out: Vec<Version> = Vec::new();
            let mut seqs = [0u64; 4];
            for (origin, seen_mask, skew) in steps {
                seqs[origin as usize] += 1;
                let mut context = VersionVector::new();
                let mut wall = skew;
                for (i, prev) in out.iter().enumerate() {
                    if seen_mask & (1 << (i % 16)) != 0 || prev.dot.origin == Incarnation(origin) {
                        context.merge(&prev.context);
                        context.advance(prev.dot);
                        wall = wall.max(prev.hlc.wall_ms + 1);
                    }
                }
                let mut v = version(origin, seqs[origin as usize], wall, &[]);
                v.context = context;
                out.push(v);
            }
            out
        })
    }

    proptest! {
        #[test]
        fn same_result_whatever_the_arrival_order(h in history(), seed in any::<u64>(), siblings in any::<bool>()) {
            let policy = if siblings { ConflictPolicy::KeepSiblings } else { ConflictPolicy::LastWriterWins };
            let mut forward = Vec::new();
            for v in &h {
                merge(policy, &mut forward, v.clone(), None);
            }
            let mut shuffled = h.clone();
            let mut rng = crate::rng::SplitMix64::new(seed);
            for i in (1..shuffled.len()).rev() {
                shuffled.swap(i, rng.below(i as u64 + 1) as usize);
            }
            let mut other = Vec::new();
            for v in shuffled {
                merge(policy, &mut other, v, None);
            }
            // The held versions (the winner, or the siblings) are the same whatever the
            // order. Contexts may differ only by dots of versions no replica holds any
            // more, which no later merge can observe.
            let mut a: Vec<Dot> = forward.iter().map(|v| v.dot).collect();
            let mut b: Vec<Dot> = other.iter().map(|v| v.dot).collect();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
        }
    }
}
